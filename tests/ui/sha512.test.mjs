// The UI's streaming SHA-512 (src/ui/sha512.js, used for "compute the checksum in the browser")
// against Node's own, at every padding boundary and fed in uneven pieces; the browser test checks
// it once more on a 64 MiB upload.

import { test } from "node:test";
import assert from "node:assert/strict";
import crypto from "node:crypto";
import { Sha512 } from "../../src/ui/sha512.js";

test("the streaming SHA-512 matches node:crypto at every block and padding boundary", () => {
  for (const n of [0, 1, 3, 111, 112, 113, 127, 128, 129, 239, 240, 241, 255, 256, 1000, 100003]) {
    const data = crypto.randomBytes(n);
    const want = crypto.createHash("sha512").update(data).digest("hex");
    const whole = new Sha512().update(data).hex();
    assert.equal(whole, want, `${n} bytes at once`);
    const pieces = new Sha512();
    for (let i = 0, step = 1; i < n; i += step, step = (step * 7 + 3) % 301 || 1) {
      pieces.update(data.subarray(i, i + step));
    }
    assert.equal(pieces.hex(), want, `${n} bytes in pieces`);
  }
});
