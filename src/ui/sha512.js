// SHA-512 over a stream of chunks, in plain JavaScript: the browser's crypto.subtle hashes only a
// whole buffer (a file in memory) and exists only on https or localhost, while a backing image
// can be many GiB and bicsi's API is often plain http beyond loopback. 64-bit words are kept as
// (high, low) pairs of 32-bit integers. The round constants are computed, not typed: the first
// 64 bits of the fractional parts of the cube roots (K) and square roots (H) of the first primes.

const MASK64 = (1n << 64n) - 1n;

/** floor(n ** (1/k)) of a BigInt, by Newton's method from above. */
function iroot(n, k) {
  const K = BigInt(k);
  let x = 1n << BigInt(Math.ceil(n.toString(2).length / k) + 1);
  for (;;) {
    const y = ((K - 1n) * x + n / x ** (K - 1n)) / K;
    if (y >= x) return x;
    x = y;
  }
}

function primes(count) {
  const out = [];
  for (let n = 2; out.length < count; n++) {
    if (out.every((p) => n % p !== 0)) out.push(n);
  }
  return out;
}

function split(words) {
  const hi = new Int32Array(words.length);
  const lo = new Int32Array(words.length);
  words.forEach((w, i) => {
    hi[i] = Number(w >> 32n) | 0;
    lo[i] = Number(w & 0xffffffffn) | 0;
  });
  return [hi, lo];
}

const P = primes(80);
const [KH, KL] = split(P.map((p) => iroot(BigInt(p) << 192n, 3) & MASK64));
const [IH, IL] = split(P.slice(0, 8).map((p) => iroot(BigInt(p) << 128n, 2) & MASK64));

export class Sha512 {
  constructor() {
    this.h = Int32Array.from(IH);
    this.l = Int32Array.from(IL);
    this.block = new Uint8Array(128);
    this.fill = 0;
    this.bytes = 0;
    this.wh = new Int32Array(80);
    this.wl = new Int32Array(80);
  }

  /** Adds bytes (a Uint8Array). */
  update(data) {
    this.bytes += data.length;
    let i = 0;
    if (this.fill > 0) {
      const n = Math.min(128 - this.fill, data.length);
      this.block.set(data.subarray(0, n), this.fill);
      this.fill += n;
      i = n;
      if (this.fill < 128) return this;
      this.compress(this.block, 0);
      this.fill = 0;
    }
    for (; i + 128 <= data.length; i += 128) this.compress(data, i);
    if (i < data.length) {
      this.block.set(data.subarray(i), 0);
      this.fill = data.length - i;
    }
    return this;
  }

  /** The digest as lower-case hex; the hash cannot be updated after. */
  hex() {
    const bits = BigInt(this.bytes) * 8n;
    const pad = new Uint8Array(((this.fill < 112 ? 112 : 240) - this.fill) + 16);
    pad[0] = 0x80;
    for (let i = 0; i < 16; i++) {
      pad[pad.length - 1 - i] = Number((bits >> BigInt(8 * i)) & 0xffn);
    }
    const bytes = this.bytes;
    this.update(pad);
    this.bytes = bytes;
    let out = "";
    for (let i = 0; i < 8; i++) {
      out += (this.h[i] >>> 0).toString(16).padStart(8, "0");
      out += (this.l[i] >>> 0).toString(16).padStart(8, "0");
    }
    return out;
  }

  compress(d, o) {
    const wh = this.wh;
    const wl = this.wl;
    for (let t = 0; t < 16; t++) {
      const j = o + t * 8;
      wh[t] = (d[j] << 24) | (d[j + 1] << 16) | (d[j + 2] << 8) | d[j + 3];
      wl[t] = (d[j + 4] << 24) | (d[j + 5] << 16) | (d[j + 6] << 8) | d[j + 7];
    }
    for (let t = 16; t < 80; t++) {
      // s0 = rotr1 ^ rotr8 ^ shr7 of w[t-15]
      let h = wh[t - 15];
      let l = wl[t - 15];
      const s0h = ((h >>> 1) | (l << 31)) ^ ((h >>> 8) | (l << 24)) ^ (h >>> 7);
      const s0l = ((l >>> 1) | (h << 31)) ^ ((l >>> 8) | (h << 24)) ^ ((l >>> 7) | (h << 25));
      // s1 = rotr19 ^ rotr61 ^ shr6 of w[t-2]
      h = wh[t - 2];
      l = wl[t - 2];
      const s1h = ((h >>> 19) | (l << 13)) ^ ((l >>> 29) | (h << 3)) ^ (h >>> 6);
      const s1l = ((l >>> 19) | (h << 13)) ^ ((h >>> 29) | (l << 3)) ^ ((l >>> 6) | (h << 26));
      const lo = (wl[t - 16] >>> 0) + (s0l >>> 0) + (wl[t - 7] >>> 0) + (s1l >>> 0);
      wh[t] = (wh[t - 16] + s0h + wh[t - 7] + s1h + Math.floor(lo / 4294967296)) | 0;
      wl[t] = lo | 0;
    }
    const H = this.h;
    const L = this.l;
    let ah = H[0], al = L[0], bh = H[1], bl = L[1], ch = H[2], cl = L[2], dh = H[3], dl = L[3];
    let eh = H[4], el = L[4], fh = H[5], fl = L[5], gh = H[6], gl = L[6], hh = H[7], hl = L[7];
    for (let t = 0; t < 80; t++) {
      // S1 = rotr14 ^ rotr18 ^ rotr41 of e
      const S1h = ((eh >>> 14) | (el << 18)) ^ ((eh >>> 18) | (el << 14)) ^ ((el >>> 9) | (eh << 23));
      const S1l = ((el >>> 14) | (eh << 18)) ^ ((el >>> 18) | (eh << 14)) ^ ((eh >>> 9) | (el << 23));
      const chh = (eh & fh) ^ (~eh & gh);
      const chl = (el & fl) ^ (~el & gl);
      const t1l = (hl >>> 0) + (S1l >>> 0) + (chl >>> 0) + (KL[t] >>> 0) + (wl[t] >>> 0);
      const t1h = (hh + S1h + chh + KH[t] + wh[t] + Math.floor(t1l / 4294967296)) | 0;
      // S0 = rotr28 ^ rotr34 ^ rotr39 of a
      const S0h = ((ah >>> 28) | (al << 4)) ^ ((al >>> 2) | (ah << 30)) ^ ((al >>> 7) | (ah << 25));
      const S0l = ((al >>> 28) | (ah << 4)) ^ ((ah >>> 2) | (al << 30)) ^ ((ah >>> 7) | (al << 25));
      const mjh = (ah & bh) ^ (ah & ch) ^ (bh & ch);
      const mjl = (al & bl) ^ (al & cl) ^ (bl & cl);
      const t2l = (S0l >>> 0) + (mjl >>> 0);
      const t2h = (S0h + mjh + Math.floor(t2l / 4294967296)) | 0;
      hh = gh; hl = gl;
      gh = fh; gl = fl;
      fh = eh; fl = el;
      const el2 = (dl >>> 0) + (t1l >>> 0);
      eh = (dh + t1h + Math.floor(el2 / 4294967296)) | 0;
      el = el2 | 0;
      dh = ch; dl = cl;
      ch = bh; cl = bl;
      bh = ah; bl = al;
      const al2 = (t1l >>> 0) + (t2l >>> 0);
      ah = (t1h + t2h + Math.floor(al2 / 4294967296)) | 0;
      al = al2 | 0;
    }
    const add = (i, xh, xl) => {
      const lo = (L[i] >>> 0) + (xl >>> 0);
      H[i] = (H[i] + xh + Math.floor(lo / 4294967296)) | 0;
      L[i] = lo | 0;
    };
    add(0, ah, al); add(1, bh, bl); add(2, ch, cl); add(3, dh, dl);
    add(4, eh, el); add(5, fh, fl); add(6, gh, gl); add(7, hh, hl);
  }
}

/** The SHA-512 of a Blob (a picked File), read in 4 MiB slices; `progress(done, total)`. */
export async function sha512OfBlob(blob, progress) {
  const hash = new Sha512();
  const step = 4 << 20;
  for (let off = 0; off < blob.size; off += step) {
    const buf = await blob.slice(off, off + step).arrayBuffer();
    hash.update(new Uint8Array(buf));
    if (progress) progress(Math.min(off + step, blob.size), blob.size);
  }
  return hash.hex();
}
