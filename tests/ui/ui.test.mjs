// bicsi's web UI in a real browser (Debian's chromium, driven by playwright-core) against a real
// `bicsi serve` (the built binary, BICSI_BIN) with two disks, and against the split mode's
// `bicsi controller` with one `bicsi node`, with images served by an HTTP server of this test on
// 127.0.0.1. Each flow is done the way a user does it (clicks, the file picker,
// the keyboard) and checked on the page and through the API. Screenshots of each page, at
// 1280×800 and at a phone's 390×844, go to UI_OUT (default target/ui-screenshots).
//
// Run by scripts/test; by hand: cargo build --bin bicsi && (cd tests/ui && npm ci && npm test).
// Needs root (the volume flows attach a loop device), like the Rust integration tests.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const targetDir = path.resolve(repo, process.env.CARGO_TARGET_DIR || "target");
const BIN = process.env.BICSI_BIN || path.join(targetDir, "debug/bicsi");
const OUT = process.env.UI_OUT || path.join(targetDir, "ui-screenshots");
const MIB = 1 << 20;

const sha512 = (buf) => crypto.createHash("sha512").update(buf).digest("hex");
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

async function until(what, fn, limitMs = 60000) {
  const end = Date.now() + limitMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}`);
    await sleep(200);
  }
}

/** `bicsi ARGS` logging to `dir/NAME.log`, once `url/healthz` answers; `stop()` ends it. */
async function started(dir, name, args, url) {
  const log = fs.openSync(path.join(dir, `${name}.log`), "w");
  const child = spawn(BIN, args, { stdio: ["ignore", log, log] });
  await until(`${name} to answer /healthz`, async () => (await fetch(`${url}/healthz`)).ok, 30000);
  return {
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        await until(`${name} to stop`, () => child.exitCode !== null || child.signalCode !== null, 20000).catch(() => child.kill("SIGKILL"));
      }
    },
  };
}

/** A `bicsi serve` in its own temp dir with two disks; `stop()` ends it. */
async function serve(name, extra = []) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `bicsi-ui-${name}-`));
  const disks = [path.join(dir, "disk-a"), path.join(dir, "disk-b")];
  for (const d of disks) fs.mkdirSync(d);
  const port = await freePort();
  const endpoint = `unix://${dir}/csi.sock`;
  const args = ["serve", "--data-dir", `${dir}/data`, "--csi-endpoint", endpoint, "--node-id", "ui-node", "--http-listen", `127.0.0.1:${port}`, ...disks.flatMap((d) => ["--disk", d]), ...extra];
  const url = `http://127.0.0.1:${port}`;
  const proc = await started(dir, "bicsi", args, url);
  return { dir, url, endpoint, stop: () => proc.stop() };
}

let b; // the bicsi under test
let images; // the image server
let imageUrl;
let browser;
let page;
const consoleErrors = [];
const outside = [];
const small = crypto.randomBytes(8 * MIB); // the downloaded image
let workDir;

/** The CLI against `b`. */
function cli(...args) {
  return execFileSync(BIN, [...args], {
    env: { ...process.env, BICSI_SERVER: b.url, BICSI_CSI_ENDPOINT: b.endpoint, BICSI_TOKEN: "" },
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    timeout: 180000,
  });
}

async function api(pathname) {
  const r = await fetch(b.url + pathname);
  assert.ok(r.ok, `${pathname}: ${r.status}`);
  return r.json();
}

async function image(name) {
  const r = await fetch(`${b.url}/v1/backingimages/${name}`);
  return r.ok ? r.json() : null;
}

const files = (bi) => Object.values((bi && bi.status.diskFileStatusMap) || {});

async function shot(name) {
  fs.mkdirSync(OUT, { recursive: true });
  await page.screenshot({ path: path.join(OUT, `${name}.png`), fullPage: true });
}

/** The row of the backing images table of `name`. */
const row = (name) => page.locator("#backingimages tbody tr", { has: page.locator("strong", { hasText: new RegExp(`^${name}$`) }) });

let visits = 0;

/** Loads a page afresh (a new query string: a change of the hash alone would not reload, and a
 * dialog left open would stay). */
async function visit(name, on = page, base = b.url) {
  visits++;
  await on.goto(`${base}/?v=${visits}#/${name}`);
}

async function openCreate() {
  await visit("backingimages");
  await page.getByRole("button", { name: "Create backing image" }).click();
  return page.locator("dialog[open]");
}

before(async () => {
  workDir = fs.mkdtempSync(path.join(os.tmpdir(), "bicsi-ui-work-"));
  // The image server: /img.raw at once, /slow.raw in pieces over about 3 s (so the page shows the
  // download in progress), anything else 404.
  images = http.createServer(async (req, res) => {
    if (req.url === "/img.raw") {
      res.writeHead(200, { "Content-Length": small.length });
      res.end(small);
    } else if (req.url === "/slow.raw") {
      res.writeHead(200, { "Content-Length": small.length });
      for (let off = 0; off < small.length; off += MIB / 2) {
        if (!res.write(small.subarray(off, off + MIB / 2))) await new Promise((r) => res.once("drain", r));
        await sleep(180);
      }
      res.end();
    } else {
      res.writeHead(404);
      res.end("no such file");
    }
  });
  await new Promise((r) => images.listen(0, "127.0.0.1", r));
  imageUrl = `http://127.0.0.1:${images.address().port}`;
  b = await serve("main");
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-background-networking", "--disable-component-update"],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
  page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error") consoleErrors.push(m.text());
  });
  page.on("pageerror", (e) => consoleErrors.push(e.message));
  // The page asks nothing of any origin but the bicsi it came from (it works on a closed network).
  page.on("request", (r) => {
    const u = r.url();
    if (!u.startsWith(b.url) && !u.startsWith("blob:") && !u.startsWith("data:")) outside.push(u);
  });
  page.on("dialog", (d) => d.accept());
});

after(async () => {
  if (browser) await browser.close();
  if (b) {
    // Detach what a failed test left attached, before bicsi stops and its directory goes.
    for (const v of ["ui-vol", "ui-att"]) {
      try {
        cli("volume", "detach", v);
      } catch {
        /* not attached */
      }
    }
    await b.stop();
    fs.rmSync(b.dir, { recursive: true, force: true });
  }
  if (images) images.close();
  if (workDir) fs.rmSync(workDir, { recursive: true, force: true });
});

test("the page is served at / with its files and shows the backing images page", async () => {
  const resp = await page.goto(`${b.url}/`);
  assert.equal(resp.status(), 200);
  assert.match(resp.headers()["content-security-policy"], /default-src 'self'/);
  await page.getByRole("heading", { name: "Backing images" }).waitFor();
  await page.locator("#live", { hasText: /^live$/ }).waitFor();
  await page.locator("#backingimages", { hasText: "No backing images yet." }).waitFor();
});

test("create from a URL: the file's progress on the disk updates live, then size and checksum", async () => {
  const dialog = await openCreate();
  let navigations = 0;
  const count = () => navigations++;
  page.on("framenavigated", count);
  await dialog.getByLabel("Name").fill("bi-dl");
  await dialog.getByLabel("Data source").selectOption("download");
  await dialog.getByLabel("URL", { exact: true }).fill(`${imageUrl}/slow.raw`);
  await dialog.locator("fieldset:not([hidden])").getByLabel("SHA-512 checksum (optional)").fill(sha512(small));
  await dialog.getByRole("button", { name: "Create" }).click();
  await dialog.waitFor({ state: "detached" });
  // While the slow server sends, the page shows the file in progress, with a progress below 100.
  await row("bi-dl").locator(".file .state-in-progress").waitFor({ timeout: 30000 });
  const seen = await row("bi-dl").locator(".file progress").first().getAttribute("value");
  assert.ok(Number(seen) < 100, `progress ${seen}`);
  await shot("backing-images-downloading");
  await row("bi-dl").locator(".image-state.state-ready").waitFor({ timeout: 60000 });
  const text = await row("bi-dl").innerText();
  assert.match(text, /8\.0 MiB/);
  assert.match(text, /raw/);
  assert.ok(text.includes(sha512(small).slice(0, 12)), text);
  page.off("framenavigated", count);
  assert.equal(navigations, 0, "the list updated without reloading the page");
});

test("a wrong checksum is shown: refused when malformed, the file failed with its message when it differs", async () => {
  let dialog = await openCreate();
  await dialog.getByLabel("Name").fill("bi-bad");
  await dialog.getByLabel("URL", { exact: true }).fill(`${imageUrl}/img.raw`);
  await dialog.locator("fieldset:not([hidden])").getByLabel("SHA-512 checksum (optional)").fill("abc");
  await dialog.getByRole("button", { name: "Create" }).click();
  // The API's 400, with its message, in the dialog.
  await dialog.locator(".dialog-errors .error", { hasText: /checksum/i }).waitFor();
  assert.equal(await image("bi-bad"), null, "nothing was created");
  await dialog.locator("fieldset:not([hidden])").getByLabel("SHA-512 checksum (optional)").fill("a".repeat(128));
  await dialog.getByRole("button", { name: "Create" }).click();
  await dialog.waitFor({ state: "detached" });
  await row("bi-bad").locator(".file .state-failed").first().waitFor({ timeout: 60000 });
  const message = await row("bi-bad").locator(".file .message").first().innerText();
  assert.match(message, /checksum/i);
  assert.match(message, /a{16}/);
  await shot("backing-images-wrong-checksum");
  // Delete it through the page; it goes from the list.
  await row("bi-bad").getByRole("button", { name: "Delete" }).click();
  await row("bi-bad").waitFor({ state: "detached" });
});

test("upload of a 64 MiB file through the file picker: checksum computed in the browser, progress shown", async () => {
  const big = crypto.randomBytes(64 * MIB);
  const file = path.join(workDir, "big.raw");
  fs.writeFileSync(file, big);
  const dialog = await openCreate();
  await dialog.getByLabel("Name").fill("bi-up");
  await dialog.getByLabel("Data source").selectOption("upload");
  await dialog.getByLabel("File (raw or qcow2)").setInputFiles(file);
  await dialog.getByLabel(/Compute the SHA-512/).check();
  // Record what the progress bar and its text show while it runs.
  await page.evaluate(() => {
    window.__seen = [];
    window.__timer = setInterval(() => {
      const p = document.querySelector("dialog[open] .progress-line progress");
      const t = document.querySelector("dialog[open] .progress-text");
      if (p && t) window.__seen.push([p.value, t.textContent]);
    }, 20);
  });
  await dialog.getByRole("button", { name: "Create" }).click();
  await dialog.waitFor({ state: "detached", timeout: 180000 });
  const seen = await page.evaluate(() => {
    clearInterval(window.__timer);
    return window.__seen;
  });
  const hashing = seen.filter(([, t]) => t.includes("computing the SHA-512"));
  const sending = seen.filter(([, t]) => t.includes("uploading"));
  assert.ok(hashing.length > 0, "the checksum's progress was shown");
  assert.ok(sending.some(([v]) => v > 0 && v < 100), `the upload's progress was shown: ${JSON.stringify(sending.slice(0, 5))}`);
  assert.ok(sending.some(([, t]) => t.includes("of 64.0 MiB")), "the total is shown");
  const bi = await image("bi-up");
  assert.equal(bi.status.checksum, sha512(big));
  assert.equal(bi.spec.checksum, sha512(big), "the checksum computed in the browser was sent");
  await row("bi-up").locator(".image-state.state-ready").waitFor();
  assert.match(await row("bi-up").innerText(), /64\.0 MiB/);
  fs.rmSync(file);
});

test("an upload whose bytes differ from the given checksum shows the API's error", async () => {
  const file = path.join(workDir, "small.raw");
  fs.writeFileSync(file, crypto.randomBytes(MIB));
  const dialog = await openCreate();
  await dialog.getByLabel("Name").fill("bi-upbad");
  await dialog.getByLabel("Data source").selectOption("upload");
  await dialog.getByLabel("File (raw or qcow2)").setInputFiles(file);
  await dialog.locator("fieldset:not([hidden])").getByLabel("SHA-512 checksum (optional)").fill("b".repeat(128));
  await dialog.getByRole("button", { name: "Create" }).click();
  const err = dialog.locator(".dialog-errors .error", { hasText: /checksum/i });
  await err.waitFor({ timeout: 60000 });
  assert.match(await err.innerText(), /b{16}/);
  await shot("backing-images-upload-error");
  await dialog.getByRole("button", { name: "Cancel" }).click();
  await page.getByRole("button", { name: "Dismiss" }).count();
});

test("download a ready file to the local machine", async () => {
  await visit("backingimages");
  const [download] = await Promise.all([page.waitForEvent("download"), row("bi-dl").getByRole("button", { name: "Download" }).click()]);
  const saved = path.join(workDir, "downloaded");
  await download.saveAs(saved);
  assert.equal(sha512(fs.readFileSync(saved)), sha512(small));
  assert.equal(download.suggestedFilename(), "bi-dl");
});

test("settings: the lifecycle settings with descriptions and defaults; a change is saved, a bad value shows the API's error", async () => {
  await visit("settings");
  const r = page.locator("#settings tbody tr", { hasText: "backing-image-cleanup-wait-interval" });
  await r.waitFor();
  assert.match(await r.innerText(), /minutes/);
  assert.match(await r.innerText(), /60/);
  assert.match(await r.innerText(), /minNumberOfCopies/);
  const input = r.getByLabel("backing-image-cleanup-wait-interval");
  await input.fill("5");
  await input.press("Enter");
  await page.locator(".notice", { hasText: "backing-image-cleanup-wait-interval = 5" }).waitFor();
  const all = await api("/v1/settings");
  assert.equal(all.find((s) => s.name === "backing-image-cleanup-wait-interval").value, "5");
  const scrub = page.locator("#settings tbody tr", { hasText: "backing-image-scrub-interval" });
  await scrub.getByLabel("backing-image-scrub-interval").fill("-1");
  await scrub.getByRole("button", { name: "Save" }).click();
  await page.locator("#errors .error", { hasText: "backing-image-scrub-interval" }).waitFor();
  await shot("settings");
});

test("restore a backing image from a backup in the target", async () => {
  const target = path.join(workDir, "backups");
  fs.mkdirSync(target);
  await visit("settings");
  const input = page.getByLabel("backup-target", { exact: true });
  await input.fill(`file://${target}`);
  await input.press("Enter");
  await page.locator(".notice", { hasText: "backup-target = file://" }).waitFor();
  const resp = await fetch(`${b.url}/v1/backingimages/bi-up/backup`, { method: "POST" });
  assert.ok(resp.ok, await resp.text());
  const dialog = await openCreate();
  await dialog.getByLabel("Name").fill("bi-restored");
  await dialog.getByLabel("Data source").selectOption("restore");
  await dialog.getByLabel("Backup URL").fill(`file://${target}#bi-up`);
  await dialog.getByRole("button", { name: "Create" }).click();
  await dialog.waitFor({ state: "detached" });
  await row("bi-restored").locator(".image-state.state-ready").waitFor({ timeout: 120000 });
  const bi = await image("bi-restored");
  assert.equal(bi.status.checksum, (await image("bi-up")).status.checksum);
});

test("volumes: create with a backing image picked from the list and its StorageClass shown; live state; its disks cannot be cleaned; delete is refused with its name", async () => {
  await visit("volumes");
  await page.locator("#volumes", { hasText: "No volumes yet." }).waitFor();
  await page.getByRole("button", { name: "Create volume" }).click();
  const create = page.locator("dialog[open]");
  await create.getByLabel("Name", { exact: true }).fill("ui-vol");
  await create.getByLabel("Size", { exact: true }).fill("64Mi");
  await create.getByLabel("Backing image", { exact: true }).selectOption("bi-dl");
  await create.getByLabel("Number of replicas", { exact: true }).fill("2");
  const yaml = await create.locator("pre.yaml").innerText();
  for (const line of ["provisioner: driver.longhorn.io", 'numberOfReplicas: "2"', 'backingImage: "bi-dl"', "name: bicsi-ui-vol"]) assert.ok(yaml.includes(line), yaml);
  await shot("volumes-create");
  await create.getByRole("button", { name: "Create" }).click();
  await create.waitFor({ state: "detached", timeout: 120000 });
  const vrow = page.locator("#volumes tbody tr", { hasText: "ui-vol" });
  await vrow.waitFor();
  assert.match(await vrow.innerText(), /64\.0 MiB/);
  assert.match(await vrow.innerText(), /bi-dl/);
  assert.match(await vrow.innerText(), /2 of 2/);
  // Each replica with its node, disk and mode.
  assert.equal(await vrow.locator(".file", { hasText: /^ui-node\/\w+ rw/ }).count(), 2, await vrow.innerText());
  const v = (await api("/v1/volumes")).find((x) => x.id === "ui-vol");
  assert.equal(v.spec.backingImage, "bi-dl");
  assert.equal(v.spec.numberOfReplicas, 2);
  // Attached by the CLI: the page shows it without a reload.
  cli("volume", "attach", "ui-vol", "--block", path.join(b.dir, "ui-vol.block"));
  await vrow.locator(".state-attached").waitFor({ timeout: 30000 });
  await shot("volumes-attached");

  // The image now has a file on both disks, each holding a replica of ui-vol.
  await until("bi-dl on both disks", async () => files(await image("bi-dl")).filter((f) => f.state === "ready").length === 2);
  await visit("backingimages");
  await row("bi-dl").getByRole("button", { name: "Clean up" }).click();
  const dialog = page.locator("dialog[open]");
  const boxes = dialog.locator("input[name=disk]");
  assert.equal(await boxes.count(), 2);
  for (let i = 0; i < 2; i++) assert.ok(await boxes.nth(i).isDisabled(), "a disk with a replica using the image is not selectable");
  assert.equal(await dialog.locator(".in-use", { hasText: "ui-vol" }).count(), 2);
  await shot("backing-images-cleanup-in-use");
  await dialog.getByRole("button", { name: "Close" }).click();

  await row("bi-dl").getByRole("button", { name: "Delete" }).click();
  const err = page.locator("#errors .error", { hasText: "used by volumes" });
  await err.waitFor();
  assert.match(await err.innerText(), /ui-vol/);
  assert.ok(await image("bi-dl"), "still there");
  await err.getByRole("button", { name: "Dismiss" }).click();
});

test("volumes: snapshot and restore with the image chosen automatically; back up and restore with an override picked", async () => {
  // An image with the same bytes as bi-dl, to override it with.
  const made = await fetch(`${b.url}/v1/backingimages`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ apiVersion: "longhorn.io/v1beta2", kind: "BackingImage", metadata: { name: "bi-dl-copy" }, spec: { sourceType: "download", sourceParameters: { url: `${imageUrl}/img.raw` }, checksum: sha512(small) } }),
  });
  assert.ok(made.ok, await made.text());
  await until("bi-dl-copy ready", async () => files(await image("bi-dl-copy")).some((f) => f.state === "ready"));

  await visit("volumes");
  const vrow = page.locator("#volumes tbody tr", { hasText: "ui-vol" });
  await vrow.getByRole("button", { name: "Snapshot" }).click();
  let dialog = page.locator("dialog[open]");
  await dialog.getByLabel("Snapshot name").fill("ui-snap");
  await dialog.getByRole("button", { name: "Take snapshot" }).click();
  await dialog.waitFor({ state: "detached", timeout: 120000 });
  const srow = page.locator("#snapshots tbody tr", { hasText: "ui-vol" });
  await srow.waitFor();
  const snapId = await srow.locator("strong").innerText();
  assert.match(await srow.innerText(), /bi-dl/);

  await srow.getByRole("button", { name: "Restore" }).click();
  dialog = page.locator("dialog[open]");
  assert.equal(await dialog.getByLabel("Backing image", { exact: true }).locator("option:checked").innerText(), "automatic: bi-dl");
  await dialog.getByLabel("New volume name").fill("ui-from-snap");
  await dialog.getByRole("button", { name: "Restore" }).click();
  await dialog.waitFor({ state: "detached", timeout: 120000 });
  await page.locator("#volumes tbody tr", { hasText: "ui-from-snap" }).waitFor();
  const fromSnap = (await api("/v1/volumes")).find((x) => x.id === "ui-from-snap");
  assert.equal(fromSnap.spec.backingImage, "bi-dl", "the snapshot's image, chosen automatically");
  assert.deepEqual(fromSnap.spec.source, { snapshot: { id: snapId } });

  // A backup of ui-vol, listed once Refresh reads the target again.
  await vrow.getByRole("button", { name: "Back up" }).click();
  await page.locator(".notice", { hasText: "backup" }).first().waitFor();
  const brow = page.locator("#backups tbody tr", { hasText: "ui-vol" });
  await until("the backup completed", async () => {
    await page.getByRole("button", { name: "Refresh backups" }).click();
    await sleep(300);
    return (await brow.count()) === 1 && /completed/.test(await brow.innerText());
  }, 120000);
  await brow.getByRole("button", { name: "Restore" }).click();
  dialog = page.locator("dialog[open]");
  const picker = dialog.getByLabel("Backing image", { exact: true });
  assert.equal(await picker.locator("option:checked").innerText(), "automatic: bi-dl");
  await picker.selectOption("bi-dl-copy");
  await dialog.getByLabel("New volume name").fill("ui-from-backup");
  await shot("volumes-restore-backup");
  await dialog.getByRole("button", { name: "Restore" }).click();
  await dialog.waitFor({ state: "detached" });
  await until("the restore completed", async () => (await api("/v1/restores/ui-from-backup")).state === "completed", 120000);
  await page.locator("#volumes tbody tr", { hasText: "ui-from-backup" }).waitFor();
  const fromBackup = (await api("/v1/volumes")).find((x) => x.id === "ui-from-backup");
  assert.equal(fromBackup.spec.backingImage, "bi-dl-copy", "the override picked");

  // Delete through the page: the restored volumes and the snapshot.
  for (const name of ["ui-from-snap", "ui-from-backup"]) {
    await page.locator("#volumes tbody tr", { hasText: name }).getByRole("button", { name: "Delete" }).click();
    await page.locator("#volumes tbody tr", { hasText: name }).waitFor({ state: "detached" });
  }
  await srow.getByRole("button", { name: "Delete" }).click();
  await srow.waitFor({ state: "detached" });
  assert.deepEqual(await api("/v1/snapshots"), []);
});

test("export a volume as a backing image through the volume picker", async () => {
  const dialog = await openCreate();
  await dialog.getByLabel("Name").fill("bi-exp");
  await dialog.getByLabel("Data source").selectOption("export-from-volume");
  await dialog.getByLabel("Volume", { exact: true }).selectOption("ui-vol");
  await dialog.getByLabel("Export type").selectOption("qcow2");
  await dialog.getByRole("button", { name: "Create" }).click();
  await dialog.waitFor({ state: "detached" });
  await row("bi-exp").locator(".image-state.state-ready").waitFor({ timeout: 120000 });
  assert.match(await row("bi-exp").innerText(), /qcow2/);
  assert.match(await row("bi-exp").innerText(), /export of volume ui-vol/);
});

test("clean up through the disk picker once no replica uses the file; the last copy is refused", async () => {
  cli("volume", "detach", "ui-vol");
  await visit("volumes");
  const vrow = page.locator("#volumes tbody tr", { hasText: "ui-vol" });
  await vrow.locator(".state-detached").waitFor();
  await vrow.getByRole("button", { name: "Delete" }).click();
  await vrow.waitFor({ state: "detached" });
  await visit("backingimages");
  await until("ui-vol gone from the page", async () => !(await row("bi-dl").innerText()).includes("ui-vol"));
  await row("bi-dl").getByRole("button", { name: "Clean up" }).click();
  let dialog = page.locator("dialog[open]");
  const boxes = dialog.locator("input[name=disk]");
  assert.equal(await boxes.count(), 2);
  const first = await boxes.nth(0).getAttribute("value");
  const second = await boxes.nth(1).getAttribute("value");
  await boxes.nth(0).check();
  await shot("backing-images-cleanup");
  await dialog.getByRole("button", { name: "Clean up" }).click();
  await dialog.locator(".notice", { hasText: `disk ${first}: cleaned up` }).waitFor();
  await dialog.getByRole("button", { name: "Close" }).click();
  await until("one file left", async () => files(await image("bi-dl")).length === 1);
  await row("bi-dl").locator(`.file[data-disk="${first}"]`).waitFor({ state: "detached" });
  // The last file stays (minNumberOfCopies 1): refused, with the reason shown.
  await row("bi-dl").getByRole("button", { name: "Clean up" }).click();
  dialog = page.locator("dialog[open]");
  await dialog.locator(`input[value="${second}"]`).check();
  await dialog.getByRole("button", { name: "Clean up" }).click();
  await dialog.locator(".dialog-errors .error", { hasText: "minNumberOfCopies" }).waitFor();
  await dialog.getByRole("button", { name: "Close" }).click();
  assert.equal(files(await image("bi-dl")).length, 1);
});

/** Whether `p` is a mount point now (/proc/self/mountinfo; this test runs as root beside bicsi). */
function mounted(p) {
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .some((l) => l.split(" ")[4] === p);
}

test("attach and detach from the page: a filesystem under bicsi's data directory, written through; the CLI's attachment shown and detached; a refusal shown", async () => {
  const made = await fetch(`${b.url}/v1/volumes`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name: "ui-att", size: "32Mi", parameters: { numberOfReplicas: "1" } }),
  });
  assert.equal(made.status, 201, await made.text());
  await visit("volumes");
  const vrow = page.locator("#volumes tbody tr", { hasText: "ui-att" });
  await vrow.getByRole("button", { name: "Attach" }).click();
  let dialog = page.locator("dialog[open]");
  await dialog.getByLabel("Attach as").selectOption("filesystem");
  await shot("volumes-attach");
  await dialog.getByRole("button", { name: "Attach" }).click();
  await dialog.waitFor({ state: "detached", timeout: 120000 });
  const where = path.join(b.dir, "data", "attached", "ui-att", "mount");
  await page.locator(".notice", { hasText: `attached as a filesystem at ${where}` }).waitFor();
  await vrow.locator(".attach-path", { hasText: where }).waitFor();
  await vrow.locator(".state-attached").waitFor();
  const [a] = await api("/v1/attachments");
  assert.deepEqual([a.volume, a.mode, a.path], ["ui-att", "filesystem", where]);
  assert.ok(mounted(where), `${where} is mounted`);
  // Written through the mount by this test, read back after a detach and a CLI attach below.
  const written = crypto.randomBytes(MIB);
  fs.writeFileSync(path.join(where, "from-the-test"), written);
  await shot("volumes-attached-ui");
  // The row with its path at a phone's width: no sideways scrolling.
  await page.setViewportSize({ width: 390, height: 844 });
  await sleep(300);
  const [scroll, width] = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
  assert.ok(scroll <= width, `volumes with an attachment: ${scroll} > ${width}`);
  await shot("phone-volumes-attached");
  await page.setViewportSize({ width: 1280, height: 800 });

  // Detach from the page: the mount goes, the row says so.
  await vrow.getByRole("button", { name: "Detach" }).click();
  await page.locator(".notice", { hasText: `volume ui-att detached from ${where}` }).waitFor();
  await vrow.getByRole("button", { name: "Attach" }).waitFor();
  assert.ok(!mounted(where));
  assert.deepEqual(await api("/v1/attachments"), []);

  // Attached by the CLI at its own path: the page shows that path, and its Detach undoes it.
  const cliMount = path.join(b.dir, "cli-mnt");
  cli("volume", "attach", "ui-att", "--mount", cliMount);
  assert.ok(fs.readFileSync(path.join(cliMount, "from-the-test")).equals(written), "the bytes written through the UI's attach");
  await vrow.locator(".attach-path", { hasText: cliMount }).waitFor({ timeout: 30000 });
  await vrow.getByRole("button", { name: "Detach" }).click();
  await vrow.getByRole("button", { name: "Attach" }).waitFor({ timeout: 30000 });
  assert.ok(!mounted(cliMount));
  assert.match(cli("volume", "detach", "ui-att"), /nothing to detach/);

  // A refusal shown: the CLI attaches the volume as a block device while the dialog is open.
  await vrow.getByRole("button", { name: "Attach" }).click();
  dialog = page.locator("dialog[open]");
  const dev = path.join(b.dir, "ui-att.block");
  cli("volume", "attach", "ui-att", "--block", dev);
  await dialog.getByRole("button", { name: "Attach" }).click();
  const err = dialog.locator(".dialog-errors .error", { hasText: `attached at ${dev}` });
  await err.waitFor({ timeout: 30000 });
  await shot("volumes-attach-refused");
  await dialog.getByRole("button", { name: "Cancel" }).click();
  await vrow.locator(".attach-path", { hasText: dev }).waitFor({ timeout: 30000 });
  await vrow.getByRole("button", { name: "Detach" }).click();
  await vrow.getByRole("button", { name: "Attach" }).waitFor({ timeout: 30000 });
  assert.ok(!fs.existsSync(dev));
  await vrow.getByRole("button", { name: "Delete" }).click();
  await vrow.waitFor({ state: "detached" });
});

test("nodes and disks: up, free space, manager running", async () => {
  await visit("nodes");
  const n = page.locator("#nodes tbody tr", { hasText: "ui-node" });
  await n.locator(".state-up").waitFor();
  const disks = page.locator("#disks tbody tr");
  await until("two disks", async () => (await disks.count()) === 2);
  for (let i = 0; i < 2; i++) {
    const t = await disks.nth(i).innerText();
    assert.match(t, /GiB|TiB|MiB/);
    assert.match(t, /ui-node/);
  }
  assert.ok((await page.locator("#disks", { hasText: "running" }).count()) > 0);
  await shot("nodes");
});

test("keyboard: every page by Tab and Enter; the create dialog opens and closes without a mouse", async () => {
  await visit("backingimages");
  await page.locator("#backingimages tbody tr").first().waitFor();
  const reached = new Set();
  for (let i = 0; i < 12; i++) {
    await page.keyboard.press("Tab");
    reached.add(await page.evaluate(() => document.activeElement.textContent.trim()));
  }
  for (const name of ["Backing images", "Volumes", "Settings", "Nodes and disks", "Create backing image"]) assert.ok(reached.has(name), `${name} by Tab: ${[...reached]}`);
  await page.getByRole("button", { name: "Create backing image" }).focus();
  await page.keyboard.press("Enter");
  await page.locator("dialog[open]").waitFor();
  assert.equal(await page.evaluate(() => document.activeElement.name), "name");
  await page.keyboard.press("Escape");
  await page.locator("dialog[open]").waitFor({ state: "detached" });
  await page.getByRole("link", { name: "Settings" }).focus();
  await page.keyboard.press("Enter");
  await page.locator("#settings").waitFor();
});

test("every page at phone width: no sideways scrolling", async () => {
  await page.setViewportSize({ width: 390, height: 844 });
  for (const p of ["backingimages", "volumes", "settings", "nodes"]) {
    await visit(p);
    await page.locator(`#${p}`).waitFor();
    await sleep(300);
    const [scroll, width] = await page.evaluate(() => [document.documentElement.scrollWidth, window.innerWidth]);
    assert.ok(scroll <= width, `${p}: ${scroll} > ${width}`);
    await shot(`phone-${p}`);
  }
  await page.setViewportSize({ width: 1280, height: 800 });
  for (const p of ["backingimages", "volumes"]) {
    await visit(p);
    await page.locator(`#${p}`).waitFor();
    await sleep(300);
    await shot(`page-${p}`);
  }
});

test("a long list pages by 20 rows", async () => {
  const names = Array.from({ length: 25 }, (_, i) => `bi-many-${String(i).padStart(2, "0")}`);
  for (const name of names) {
    const r = await fetch(`${b.url}/v1/backingimages`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ apiVersion: "longhorn.io/v1beta2", kind: "BackingImage", metadata: { name }, spec: { sourceType: "upload" } }),
    });
    assert.ok(r.ok, await r.text());
  }
  await visit("backingimages");
  const total = (await api("/v1/backingimages")).length;
  const pager = page.locator(".pager", { hasText: "of" });
  await pager.locator("span", { hasText: `1–20 of ${total}` }).waitFor();
  assert.equal(await page.locator("#backingimages tbody tr").count(), 20);
  await pager.getByRole("button", { name: "Next" }).click();
  await pager.locator("span", { hasText: `21–${Math.min(40, total)} of ${total}` }).waitFor();
  assert.equal(await page.locator("#backingimages tbody tr").count(), Math.min(20, total - 20));
  await pager.getByRole("button", { name: "Previous" }).click();
  await pager.locator("span", { hasText: `1–20 of ${total}` }).waitFor();
  for (const name of names) await fetch(`${b.url}/v1/backingimages/${name}`, { method: "DELETE" });
  await page.locator(".pager").waitFor({ state: "detached" });
});

test("with an API token: the login prompt, a wrong token refused with the API's message, the token in sessionStorage only", async () => {
  const tokenFile = path.join(workDir, "token");
  fs.writeFileSync(tokenFile, "ui-secret\n");
  const t = await serve("token", ["--api-token-file", tokenFile]);
  try {
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const p = await ctx.newPage();
    await p.goto(`${t.url}/`);
    const login = p.locator("dialog#login[open]");
    await login.waitFor();
    assert.match(await login.innerText(), /requires a token/);
    await login.getByLabel("Token").fill("nope");
    await login.getByRole("button", { name: "Sign in" }).click();
    await p.locator("dialog#login[open]", { hasText: "token is wrong" }).waitFor();
    await p.locator("dialog#login[open]").getByLabel("Token").fill("ui-secret");
    await p.locator("dialog#login[open]").getByRole("button", { name: "Sign in" }).click();
    await p.locator("#backingimages", { hasText: "No backing images yet." }).waitFor();
    await p.locator("#live", { hasText: /^live$/ }).waitFor();
    const stored = await p.evaluate(() => [sessionStorage.getItem("bicsi-api-token"), localStorage.length, document.cookie]);
    assert.deepEqual(stored, ["ui-secret", 0, ""]);
    await ctx.close();
  } finally {
    await t.stop();
    fs.rmSync(t.dir, { recursive: true, force: true });
  }
});

test("the split mode's controller serves the same page: its node and disk, a download created through it, its errors shown", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "bicsi-ui-split-"));
  const [httpPort, clusterPort, agentPort, nodeHttp] = [await freePort(), await freePort(), await freePort(), await freePort()];
  const ctlUrl = `http://127.0.0.1:${httpPort}`;
  const procs = [];
  try {
    // The page is what is tested here, not the cluster's transport (tests/mtls.rs is): the
    // two processes talk plain TCP on 127.0.0.1, which the split mode takes only when told.
    procs.push(await started(dir, "controller", ["controller", "--insecure", "--data-dir", `${dir}/controller`, "--csi-endpoint", `unix://${dir}/controller.sock`, "--http-listen", `127.0.0.1:${httpPort}`, "--cluster-listen", `127.0.0.1:${clusterPort}`], ctlUrl));
    const nodeDir = path.join(dir, "n1");
    fs.mkdirSync(path.join(nodeDir, "disk"), { recursive: true });
    procs.push(
      await started(dir, "node", ["node", "--insecure", "--node-id", "split-n1", "--data-dir", `${nodeDir}/data`, "--csi-endpoint", `unix://${nodeDir}/csi.sock`, "--disk", `${nodeDir}/disk`, "--controller", `http://127.0.0.1:${clusterPort}`, "--agent-listen", `127.0.0.1:${agentPort}`, "--http-listen", `127.0.0.1:${nodeHttp}`, "--nbd-listen", `127.0.0.1:${await freePort()}`], `http://127.0.0.1:${nodeHttp}`)
    );
    const ctx = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
    const p = await ctx.newPage();
    const errors = [];
    p.on("pageerror", (e) => errors.push(e.message));
    p.on("dialog", (d) => d.accept());
    await p.goto(`${ctlUrl}/?split#/nodes`);
    await p.locator("#nodes tbody tr", { hasText: "split-n1" }).locator(".state-up").waitFor({ timeout: 30000 });
    await p.locator("#disks tbody tr", { hasText: "split-n1" }).waitFor();
    // The controller runs no node: the volumes page says why it cannot attach, and its
    // buttons are disabled with that reason.
    const vol = await fetch(`${ctlUrl}/v1/volumes`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ name: "split-vol", size: "16Mi", parameters: { numberOfReplicas: "1" } }),
    });
    assert.equal(vol.status, 201, await vol.text());
    await p.goto(`${ctlUrl}/?split1#/volumes`);
    await p.locator(".attach-unavailable", { hasText: "split mode" }).waitFor();
    const attachButton = p.locator("#volumes tbody tr", { hasText: "split-vol" }).getByRole("button", { name: "Attach" });
    assert.ok(await attachButton.isDisabled());
    assert.match(await attachButton.getAttribute("title"), /split mode/);
    // A cluster's downloads may not reach loopback by default (the download guard); this
    // test's image server is there, so open the hole an operator would.
    const hole = await fetch(`${ctlUrl}/v1/settings/backing-image-download-allowed-networks`, {
      method: "PUT",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ value: "127.0.0.1" }),
    });
    assert.equal(hole.status, 200, await hole.text());
    await p.goto(`${ctlUrl}/?split2#/backingimages`);
    await p.getByRole("button", { name: "Create backing image" }).click();
    const dialog = p.locator("dialog[open]");
    await dialog.getByLabel("Name", { exact: true }).fill("bi-split");
    await dialog.getByLabel("URL", { exact: true }).fill(`${imageUrl}/img.raw`);
    await dialog.getByRole("button", { name: "Create" }).click();
    await dialog.waitFor({ state: "detached" });
    const r = p.locator("#backingimages tbody tr", { hasText: "bi-split" });
    await r.locator(".image-state.state-ready").waitFor({ timeout: 60000 });
    // The controller holds no files: its 501 is shown, not saved as the file.
    await r.getByRole("button", { name: "Download" }).click();
    await p.locator("#errors .error", { hasText: "not supported" }).waitFor();
    await p.screenshot({ path: path.join(OUT, "split-controller.png"), fullPage: true });
    assert.deepEqual(errors, []);
    await ctx.close();
  } finally {
    for (const proc of procs.reverse()) await proc.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test("no console errors (a CSP violation is one) and no request beyond the bicsi served from", () => {
  assert.deepEqual(consoleErrors.filter((e) => !/status of (400|404|409|412|500)/.test(e)), []);
  assert.deepEqual(outside, []);
});
