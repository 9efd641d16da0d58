// bicsi's web UI: the pages (Backing images, Volumes, Settings, Nodes and disks) drawn from the
// lists `GET /v1/events` streams, and the forms that call the API. It holds no rule of bicsi's:
// what the API refuses is shown with the API's message.

import { ApiError, call, raw, token, upload, watch } from "/ui/api.js";
import { sha512OfBlob } from "/ui/sha512.js";

const PAGE_SIZE = 20;

// The latest of each list, as the event stream sent it (null: not heard yet).
const data = { backingimages: null, volumes: null, snapshots: null, disks: null, nodes: null, settings: null };
// What failed to load per topic (a node agent alone has no volumes, ...).
const topicErrors = {};
// The first row shown per table.
const pageStart = {};

// ------------------------------------------------------------------ small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}

function short(checksum) {
  return checksum ? checksum.slice(0, 12) + "…" : "—";
}

/** Shows an error with its message: in the open dialog if one is open, else at the top. */
export function showError(err, where) {
  const message = err instanceof Error ? err.message : String(err);
  const dialog = document.querySelector("dialog[open]:not(#login)");
  const box = where || (dialog && dialog.querySelector(".dialog-errors")) || document.getElementById("errors");
  const dismiss = h("button", { type: "button", "aria-label": "Dismiss this error" }, "Dismiss");
  const line = h("div", { class: "error" }, h("span", { class: "error-text" }, message), dismiss);
  dismiss.addEventListener("click", () => line.remove());
  box.append(line);
  if (err instanceof Error && !(err instanceof ApiError)) console.error(err);
}

function notice(text, where) {
  const box = where || document.getElementById("errors");
  const line = h("div", { class: "notice", role: "status" }, text);
  box.append(line);
  setTimeout(() => line.remove(), 8000);
}

/** Runs an action of a button: disabled while it runs, its error shown. */
async function act(button, fn) {
  if (button) button.disabled = true;
  try {
    await fn();
  } catch (e) {
    showError(e);
  } finally {
    if (button) button.disabled = false;
  }
}

/** A table whose rows page by PAGE_SIZE; `columns`: [label, (row) => cell content]. */
function table(id, caption, columns, rows, emptyText) {
  const start = Math.min(pageStart[id] || 0, Math.max(0, rows.length - 1 - ((rows.length - 1) % PAGE_SIZE)));
  pageStart[id] = start;
  const shown = rows.slice(start, start + PAGE_SIZE);
  const t = h(
    "table",
    { id, class: "cardable" },
    h("caption", { class: "muted" }, caption),
    h("thead", {}, h("tr", {}, columns.map(([label]) => h("th", { scope: "col" }, label)))),
    h(
      "tbody",
      {},
      shown.length === 0
        ? h("tr", {}, h("td", { colspan: columns.length, class: "muted" }, emptyText))
        : shown.map((row) =>
            h("tr", { "data-key": row.__key }, columns.map(([label, cell]) => h("td", { "data-label": label }, cell(row))))
          )
    )
  );
  const wrap = h("div", { class: "table-wrap" }, t);
  if (rows.length > PAGE_SIZE) {
    const go = (to) => {
      pageStart[id] = to;
      render();
    };
    wrap.append(
      h(
        "div",
        { class: "pager" },
        h("button", { type: "button", disabled: start === 0, "data-key": `${id}-prev`, onclick: () => go(Math.max(0, start - PAGE_SIZE)) }, "Previous"),
        h("span", {}, `${start + 1}–${Math.min(start + PAGE_SIZE, rows.length)} of ${rows.length}`),
        h("button", { type: "button", disabled: start + PAGE_SIZE >= rows.length, "data-key": `${id}-next`, onclick: () => go(start + PAGE_SIZE) }, "Next")
      )
    );
  }
  return wrap;
}

function topicNote(topic) {
  if (topicErrors[topic]) return h("div", { class: "error" }, h("span", { class: "error-text" }, `${topic}: ${topicErrors[topic]}`));
  if (data[topic] === null) return h("p", { class: "muted" }, "Loading…");
  return null;
}

function openDialog(title, body, onClose) {
  const dialog = h(
    "dialog",
    { "aria-label": title },
    h("h2", {}, title),
    h("div", { class: "dialog-errors", role: "alert" }),
    body
  );
  dialog.addEventListener("close", () => {
    dialog.remove();
    if (onClose) onClose();
  });
  document.body.append(dialog);
  dialog.showModal();
  return dialog;
}

// ------------------------------------------------------------------ backing images page

function volumesUsing(name) {
  return (data.volumes || []).filter((v) => v.spec && v.spec.backingImage === name);
}

function imageState(bi) {
  const files = Object.values(bi.status.diskFileStatusMap || {});
  if (files.some((f) => f.state === "ready")) return "ready";
  if (files.some((f) => ["pending", "starting", "in-progress"].includes(f.state))) return "in-progress";
  if (files.some((f) => f.state === "failed")) return "failed";
  return files.length ? files[0].state : "pending";
}

function sourceText(bi) {
  const p = bi.spec.sourceParameters || {};
  switch (bi.spec.sourceType) {
    case "download":
      return ["download ", h("span", { class: "mono" }, p.url || "")];
    case "export-from-volume":
      return `export of volume ${p["volume-name"] || "?"} (${p["export-type"] || "raw"})`;
    case "restore":
      return ["restore ", h("span", { class: "mono" }, p["backup-url"] || "")];
    default:
      return bi.spec.sourceType;
  }
}

function filesCell(bi) {
  const files = Object.entries(bi.status.diskFileStatusMap || {});
  if (files.length === 0) return h("span", { class: "muted" }, "no file yet");
  return files.map(([disk, f]) =>
    h(
      "div",
      { class: "file", "data-disk": disk },
      h("span", { class: "mono" }, disk),
      " ",
      h("progress", { max: 100, value: f.progress, "aria-label": `${bi.metadata.name} on ${disk}: ${f.progress}%` }),
      " ",
      h("span", { class: `state-${f.state}` }, f.state),
      ` ${f.progress}%`,
      f.message ? h("div", { class: f.state === "failed" ? "message" : "muted" }, f.message) : null
    )
  );
}

async function download(bi, button) {
  const path = `/v1/backingimages/${encodeURIComponent(bi.metadata.name)}/file`;
  if (!token()) {
    // The browser streams the file to disk itself; its first byte is asked for first, so an
    // error (no ready file here, a controller without disks) is shown instead of saved as the file.
    await act(button, async () => {
      const probe = await raw("GET", path, { headers: { Range: "bytes=0-0" } });
      await probe.body?.cancel();
      const a = h("a", { href: path, download: bi.metadata.name });
      document.body.append(a);
      a.click();
      a.remove();
    });
    return;
  }
  // With a token the request needs its header: fetched into a Blob (which Chromium keeps on
  // disk when large), then saved.
  await act(button, async () => {
    const resp = await raw("GET", path);
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: bi.metadata.name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  });
}

function cleanupDialog(bi) {
  const name = bi.metadata.name;
  const disks = data.disks || [];
  const users = volumesUsing(name);
  const usedOn = {};
  for (const v of users) for (const r of v.replicas || []) (usedOn[r.diskId] ||= []).push(v.id);
  const held = Object.entries(bi.status.diskFileStatusMap || {});
  const result = h("div", { class: "cleanup-result", role: "status" });
  const choices = held.map(([diskId, f]) => {
    const disk = disks.find((d) => d.disk.id === diskId);
    const inUse = usedOn[diskId];
    const id = `cleanup-${diskId}`;
    return h(
      "div",
      { class: "disk-choice" },
      h(
        "label",
        { for: id },
        h("input", { type: "checkbox", id, name: "disk", value: diskId, disabled: !!inUse }),
        " ",
        h("span", { class: "mono" }, diskId),
        disk ? ` on node ${disk.disk.nodeId || disk.disk.node_id || ""} (${disk.disk.path})` : "",
        ` — file ${f.state}`,
        inUse ? h("div", { class: "muted in-use" }, `holds a replica of volume ${inUse.join(", ")}: its file cannot be cleaned up`) : null
      )
    );
  });
  const submit = h("button", { type: "submit", class: "primary" }, "Clean up");
  const form = h(
    "form",
    {},
    h("p", {}, "Choose the disks to remove this image's file from. A disk holding a replica that uses the image keeps its file, and bicsi keeps at least minNumberOfCopies files."),
    held.length ? choices : h("p", { class: "muted" }, "No disk holds a file of this image."),
    result,
    h("div", { class: "buttons" }, h("button", { type: "button", onclick: () => dialog.close() }, "Close"), submit)
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const chosen = [...form.querySelectorAll("input[name=disk]:checked")].map((i) => i.value);
    if (chosen.length === 0) {
      showError("choose at least one disk to clean up");
      return;
    }
    act(submit, async () => {
      const r = await call("POST", `/v1/backingimages/${encodeURIComponent(name)}/cleanup`, { disks: chosen });
      result.replaceChildren(
        ...r.cleaned.map((d) => h("div", { class: "notice" }, `disk ${d}: cleaned up`))
      );
      for (const f of r.refused) showError(`disk ${f.disk}: refused: ${f.reason}`);
    });
  });
  const dialog = openDialog(`Clean up backing image ${name}`, form);
}

async function deleteImage(bi, button) {
  const name = bi.metadata.name;
  if (!confirm(`Delete backing image ${name} and all its files?`)) return;
  await act(button, async () => {
    await call("DELETE", `/v1/backingimages/${encodeURIComponent(name)}`);
    notice(`backing image ${name} deleted`);
  });
}

function createDialog() {
  // A field: its label names it alone (a label around a select would add the chosen option to
  // the name); a hint describes it.
  let fields = 0;
  const f = (label, input, hint) => {
    const id = `field-${++fields}`;
    input.id = id;
    const out = h("div", { class: "field" }, h("label", { for: id }, label), input);
    if (hint) {
      input.setAttribute("aria-describedby", `${id}-hint`);
      out.append(h("div", { id: `${id}-hint`, class: "muted hint" }, hint));
    }
    return out;
  };
  const name = h("input", { name: "name", required: true, pattern: "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", autocomplete: "off" });
  const source = h(
    "select",
    { name: "source" },
    h("option", { value: "download" }, "Download from a URL"),
    h("option", { value: "upload" }, "Upload a local file"),
    h("option", { value: "export-from-volume" }, "Export a volume"),
    h("option", { value: "restore" }, "Restore from a backup")
  );
  const url = h("input", { name: "url", type: "url", autocomplete: "off" });
  const checksum = h("input", { name: "checksum", autocomplete: "off", class: "mono" });
  const file = h("input", { name: "file", type: "file" });
  const compute = h("input", { name: "compute", type: "checkbox" });
  const volume = h("select", { name: "volume" });
  for (const v of data.volumes || []) volume.append(h("option", { value: v.id }, `${v.id} (${bytes(v.spec.capacityBytes)})`));
  if (!volume.options.length) volume.append(h("option", { value: "" }, "no volumes"));
  const exportType = h("select", { name: "exportType" }, h("option", { value: "raw" }, "raw"), h("option", { value: "qcow2" }, "qcow2"));
  const backupUrl = h("input", { name: "backupUrl", autocomplete: "off", class: "mono" });
  const copies = h("input", { name: "copies", type: "number", min: 1, value: 1 });
  const progress = h("progress", { max: 100, value: 0, "aria-label": "upload progress" });
  const progressText = h("span", { class: "progress-text" }, "");
  const progressLine = h("div", { class: "progress-line", hidden: true }, progress, progressText);

  const parts = {
    download: h("fieldset", {}, h("legend", {}, "Download"), f("URL", url), f("SHA-512 checksum (optional)", checksum.cloneNode())),
    upload: h(
      "fieldset",
      {},
      h("legend", {}, "Upload"),
      f("File (raw or qcow2)", file),
      f("SHA-512 checksum (optional)", checksum.cloneNode()),
      h("label", {}, compute, " Compute the SHA-512 in this browser before sending (reads the file twice)"),
      h("p", { class: "muted" }, "An upload cannot resume: if the connection drops, bicsi marks the file failed; delete the image and upload again.")
    ),
    "export-from-volume": h("fieldset", {}, h("legend", {}, "Export a volume"), f("Volume", volume), f("Export type", exportType)),
    restore: h("fieldset", {}, h("legend", {}, "Restore from a backup"), f("Backup URL", backupUrl, "the backup target and image backup: TARGET#NAME, as bicsi backup image prints it"), f("SHA-512 checksum (optional)", checksum.cloneNode())),
  };
  const checksumOf = (src) => {
    const input = parts[src].querySelector("input[name=checksum]");
    return input ? input.value.trim() : "";
  };
  const showPart = () => {
    for (const [k, el] of Object.entries(parts)) el.hidden = k !== source.value;
  };
  source.addEventListener("change", showPart);
  showPart();

  const submit = h("button", { type: "submit", class: "primary" }, "Create");
  const form = h(
    "form",
    { novalidate: true },
    f("Name", name, "lower-case letters, digits and '-'"),
    f("Data source", source),
    Object.values(parts),
    f("Minimum number of copies", copies),
    progressLine,
    h("div", { class: "buttons" }, h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"), submit)
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    act(submit, async () => {
      const src = source.value;
      const spec = { sourceType: src, sourceParameters: {}, minNumberOfCopies: Number(copies.value) || 1 };
      let sum = checksumOf(src);
      if (src === "download") spec.sourceParameters.url = url.value.trim();
      if (src === "export-from-volume") {
        spec.sourceParameters["volume-name"] = volume.value;
        spec.sourceParameters["export-type"] = exportType.value;
      }
      if (src === "restore") spec.sourceParameters["backup-url"] = backupUrl.value.trim();
      const picked = file.files && file.files[0];
      if (src === "upload") {
        if (!picked) throw new ApiError(0, "choose the file to upload");
        if (parts.upload.querySelector("input[name=compute]").checked && !sum) {
          progressLine.hidden = false;
          sum = await sha512OfBlob(picked, (done, total) => {
            progress.value = Math.floor((done * 100) / total);
            progressText.textContent = ` computing the SHA-512: ${bytes(done)} of ${bytes(total)}`;
          });
          parts.upload.querySelector("input[name=checksum]").value = sum;
        }
      }
      if (sum) spec.checksum = sum;
      const object = {
        apiVersion: "longhorn.io/v1beta2",
        kind: "BackingImage",
        metadata: { name: name.value.trim(), namespace: "longhorn-system" },
        spec,
      };
      await call("POST", "/v1/backingimages", object);
      if (src !== "upload") {
        notice(`backing image ${object.metadata.name} created`);
        dialog.close();
        return;
      }
      progressLine.hidden = false;
      const headers = sum ? { "X-Bicsi-Checksum": sum } : {};
      await upload(`/v1/backingimages/${encodeURIComponent(object.metadata.name)}/file`, picked, headers, (sent, total) => {
        progress.value = total ? Math.floor((sent * 100) / total) : 0;
        progressText.textContent = ` uploading: ${bytes(sent)} of ${bytes(total)} (${progress.value}%)`;
      });
      progressText.textContent = " uploaded; the file is ready";
      notice(`backing image ${object.metadata.name} uploaded`);
      dialog.close();
    });
  });
  const dialog = openDialog("Create backing image", form);
  name.focus();
}

function backingImagesPage() {
  const rows = (data.backingimages || []).map((bi) => Object.assign({ __key: bi.metadata.name }, bi));
  return [
    h("div", { class: "bar" }, h("h2", {}, "Backing images"), h("button", { type: "button", class: "primary", id: "create-bi", "data-key": "create-bi", onclick: createDialog }, "Create backing image")),
    topicNote("backingimages"),
    table(
      "backingimages",
      "Backing images with their file on each disk, live",
      [
        ["Name", (bi) => h("strong", {}, bi.metadata.name)],
        ["Source", sourceText],
        [
          "State",
          (bi) => [
            h("span", { class: `state-${imageState(bi)} image-state` }, imageState(bi)),
            bi.status.message ? h("div", { class: "message" }, bi.status.message) : null,
          ],
        ],
        ["Size", (bi) => (bi.status.size ? bytes(bi.status.size) : "—")],
        ["Virtual size", (bi) => (bi.status.virtualSize ? bytes(bi.status.virtualSize) : "—")],
        ["Format", (bi) => bi.status.format || "—"],
        ["Checksum (SHA-512)", (bi) => h("span", { class: "mono", title: bi.status.checksum || bi.spec.checksum || "" }, short(bi.status.checksum || bi.spec.checksum))],
        ["Files on disks", filesCell],
        ["Used by", (bi) => volumesUsing(bi.metadata.name).map((v) => v.id).join(", ") || "—"],
        [
          "Operations",
          (bi) => {
            const n = bi.metadata.name;
            const ready = Object.values(bi.status.diskFileStatusMap || {}).some((f) => f.state === "ready");
            const dl = h("button", { type: "button", "data-key": `download-${n}`, disabled: !ready, title: ready ? "" : "no ready file yet" }, "Download");
            dl.addEventListener("click", () => download(bi, dl));
            const clean = h("button", { type: "button", "data-key": `cleanup-${n}`, onclick: () => cleanupDialog(bi) }, "Clean up");
            const del = h("button", { type: "button", class: "danger", "data-key": `delete-${n}` }, "Delete");
            del.addEventListener("click", () => deleteImage(bi, del));
            return h("div", { class: "ops", "aria-label": `Operations of ${n}` }, dl, clean, del);
          },
        ],
      ],
      rows,
      "No backing images yet."
    ),
  ];
}

// ------------------------------------------------------------------ volumes page

function volumeState(v) {
  if (v.fault) return "faulted";
  if ((v.replicas || []).some((r) => r.mode === "err") || (v.replicas || []).length < v.spec.numberOfReplicas) return "degraded";
  return v.publication ? "attached" : "detached";
}

/** Sends a request that the controller answers 503 while a backing image is being prepared
 * again every 2 s (as the CSI provisioner retries), showing its message, for up to 10 minutes. */
async function retryingUnavailable(send, status) {
  const end = Date.now() + 600000;
  for (;;) {
    try {
      return await send();
    } catch (e) {
      if (!(e instanceof ApiError) || e.status !== 503 || Date.now() > end) throw e;
      status.textContent = `waiting: ${e.message}`;
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
}

/** A select of the backing images: `auto` (the text of the automatic choice) first when given. */
function imagePicker(id, auto) {
  const select = h("select", { id, name: "backingImage" });
  if (auto !== undefined) select.append(h("option", { value: "" }, auto ? `automatic: ${auto}` : "automatic: none"));
  else select.append(h("option", { value: "" }, "none (an empty volume)"));
  for (const bi of data.backingimages || []) select.append(h("option", { value: bi.metadata.name }, `${bi.metadata.name} (${imageState(bi)})`));
  return select;
}

function field(label, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2)}`;
  input.id = id;
  const out = h("div", { class: "field" }, h("label", { for: id }, label), input);
  if (hint) {
    input.setAttribute("aria-describedby", `${id}-hint`);
    out.append(h("div", { id: `${id}-hint`, class: "muted hint" }, hint));
  }
  return out;
}

/** The StorageClass a Kubernetes user would write for these parameters. */
function storageClassYaml(name, params) {
  const q = (v) => JSON.stringify(String(v));
  const lines = ["kind: StorageClass", "apiVersion: storage.k8s.io/v1", "metadata:", `  name: ${name || "NAME"}`, "provisioner: driver.longhorn.io", "allowVolumeExpansion: true", "reclaimPolicy: Delete", "volumeBindingMode: Immediate", "parameters:"];
  for (const [k, v] of Object.entries(params)) lines.push(`  ${k}: ${q(v)}`);
  return lines.join("\n");
}

function createVolumeDialog() {
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const size = h("input", { name: "size", value: "1Gi", autocomplete: "off" });
  const image = imagePicker("volume-image");
  const replicas = h("input", { name: "replicas", type: "number", min: 1, value: 1 });
  const fsType = h("select", { name: "fsType" }, h("option", { value: "ext4" }, "ext4"), h("option", { value: "xfs" }, "xfs"));
  const yaml = h("pre", { class: "yaml", "aria-label": "The StorageClass parameters as YAML" });
  const status = h("div", { class: "muted", role: "status" });
  const params = () => {
    const p = { numberOfReplicas: replicas.value || "1", fsType: fsType.value };
    if (image.value) p.backingImage = image.value;
    return p;
  };
  const show = () => (yaml.textContent = storageClassYaml(name.value ? `bicsi-${name.value}` : "", params()));
  for (const el of [name, image, replicas, fsType]) el.addEventListener("input", show);
  show();
  const submit = h("button", { type: "submit", class: "primary" }, "Create");
  const form = h(
    "form",
    { novalidate: true },
    field("Name", name),
    field("Size", size, "a quantity: 256Mi, 10Gi"),
    field("Backing image", image, "from the backing image list; bicsi prepares its file on the replicas' disks"),
    field("Number of replicas", replicas),
    field("Filesystem", fsType),
    h("h3", {}, "As a StorageClass"),
    yaml,
    status,
    h("div", { class: "buttons" }, h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"), submit)
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    act(submit, async () => {
      const v = await retryingUnavailable(() => call("POST", "/v1/volumes", { name: name.value.trim(), size: size.value.trim(), parameters: params() }), status);
      notice(`volume ${v.id} created`);
      dialog.close();
    });
  });
  const dialog = openDialog("Create volume", form);
  name.focus();
}

function restoreDialog(title, auto, sizeBytes, send) {
  const name = h("input", { name: "name", required: true, autocomplete: "off" });
  const image = imagePicker("restore-image", auto || "");
  const status = h("div", { class: "muted", role: "status" });
  const submit = h("button", { type: "submit", class: "primary" }, "Restore");
  const form = h(
    "form",
    { novalidate: true },
    field("New volume name", name),
    field("Backing image", image, auto ? `the backup's volume used ${auto}; pick another to override it` : "the source used none; pick one to override"),
    h("p", { class: "muted" }, `Size: ${bytes(sizeBytes)}`),
    status,
    h("div", { class: "buttons" }, h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"), submit)
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    act(submit, async () => {
      const text = await retryingUnavailable(() => send(name.value.trim(), image.value), status);
      notice(text);
      dialog.close();
    });
  });
  const dialog = openDialog(title, form);
  name.focus();
}

function snapshotVolume(v) {
  const name = h("input", { name: "name", required: true, autocomplete: "off", value: `${v.id}-snap-${new Date().toISOString().slice(0, 19).replace(/[-:T]/g, "")}` });
  const kind = h("select", { name: "type" }, h("option", { value: "snap" }, "snapshot (snap)"), h("option", { value: "bi" }, "snapshot exported as a backing image (bi)"));
  const submit = h("button", { type: "submit", class: "primary" }, "Take snapshot");
  const form = h(
    "form",
    { novalidate: true },
    field("Snapshot name", name),
    field("Type", kind),
    h("div", { class: "buttons" }, h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"), submit)
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    act(submit, async () => {
      const parameters = kind.value === "bi" ? { type: "bi" } : {};
      const s = await call("POST", "/v1/snapshots", { name: name.value.trim(), volume: v.id, parameters });
      notice(`snapshot ${s.id} of ${v.id} taken`);
      dialog.close();
    });
  });
  const dialog = openDialog(`Snapshot of volume ${v.id}`, form);
  name.focus();
}

function backupVolume(v, button) {
  act(button, async () => {
    const b = await call("POST", "/v1/backups", { volume: v.id });
    notice(`backup ${b.name} of ${v.id} started`);
    loadBackups();
  });
}

function deleteVolume(v, button) {
  if (!confirm(`Delete volume ${v.id} and its replicas?`)) return;
  act(button, async () => {
    await call("DELETE", `/v1/volumes/${encodeURIComponent(v.id)}`);
    notice(`volume ${v.id} deleted`);
  });
}

// What is attached on this node through its CSI socket (by the UI or the CLI), read again
// whenever the volumes change; `attachError` is why this server cannot attach (the split mode's
// controller runs no node), shown instead of the buttons.
let attachments = null;
let attachError = "";

async function loadAttachments() {
  try {
    attachments = await call("GET", "/v1/attachments");
    attachError = "";
  } catch (e) {
    attachments = [];
    attachError = e.message;
  }
  if (current() === "volumes") render();
}

function attachmentOf(v) {
  return (attachments || []).find((a) => a.volume === v.id);
}

function attachDialog(v) {
  const mode = h("select", { name: "mode" }, h("option", { value: "filesystem" }, "filesystem (mounted)"), h("option", { value: "block" }, "block device"));
  const readOnly = h("input", { type: "checkbox", name: "readOnly" });
  const status = h("div", { class: "muted", role: "status" });
  const submit = h("button", { type: "submit", class: "primary" }, "Attach");
  const form = h(
    "form",
    { novalidate: true },
    field("Attach as", mode, "bicsi chooses the path: under its data directory on this node"),
    h("div", { class: "field" }, h("label", {}, readOnly, " read-only")),
    status,
    h("div", { class: "buttons" }, h("button", { type: "button", onclick: () => dialog.close() }, "Cancel"), submit)
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    act(submit, async () => {
      status.textContent = "attaching…";
      let a;
      try {
        a = await retryingUnavailable(() => call("POST", `/v1/volumes/${encodeURIComponent(v.id)}/attach`, { mode: mode.value, readOnly: readOnly.checked }), status);
      } finally {
        status.textContent = "";
      }
      notice(`volume ${v.id} attached as ${a.mode === "block" ? "a block device" : "a filesystem"} at ${a.path}`);
      dialog.close();
      await loadAttachments();
    });
  });
  const dialog = openDialog(`Attach volume ${v.id} on this node`, form);
  mode.focus();
}

function detachVolume(v, button) {
  act(button, async () => {
    const d = await call("POST", `/v1/volumes/${encodeURIComponent(v.id)}/detach`);
    notice(d.detached ? `volume ${v.id} detached from ${d.path}` : `volume ${v.id} was not attached`);
    await loadAttachments();
  });
}

// The backups in the target: asked for on demand (the target may be remote), not streamed.
let backups = null;
let backupsError = "";

async function loadBackups(button) {
  await act(button, async () => {
    try {
      backups = await call("GET", "/v1/backups");
      backupsError = "";
    } catch (e) {
      backups = [];
      backupsError = e.message;
    }
    if (current() === "volumes") render();
  });
}

function volumesPage() {
  const rows = (data.volumes || []).map((v) => Object.assign({ __key: v.id }, v));
  const snaps = (data.snapshots || []).map((s) => Object.assign({ __key: s.id }, s));
  if (backups === null) {
    backups = [];
    loadBackups();
  }
  if (attachments === null) {
    attachments = [];
    loadAttachments();
  }
  return [
    h("div", { class: "bar" }, h("h2", {}, "Volumes"), h("button", { type: "button", class: "primary", "data-key": "create-volume", onclick: createVolumeDialog }, "Create volume")),
    topicNote("volumes"),
    table(
      "volumes",
      "Volumes with their replicas, live",
      [
        ["Name", (v) => h("strong", {}, v.id)],
        ["State", (v) => [h("span", { class: `state-${volumeState(v)}` }, volumeState(v)), v.fault ? h("div", { class: "message" }, v.fault) : null]],
        ["Size", (v) => bytes(v.spec.capacityBytes)],
        ["Backing image", (v) => v.spec.backingImage || "—"],
        ["Engine", (v) => v.spec.engine || "—"],
        [
          "Replicas",
          (v) => [
            `${(v.replicas || []).length} of ${v.spec.numberOfReplicas}`,
            (v.replicas || []).map((r) =>
              h("div", { class: "file" }, h("span", { class: "mono" }, `${r.nodeId}/${r.diskId}`), " ", h("span", { class: `state-${r.mode || "rw"}` }, r.mode || "rw"), r.deferred ? " (made at first attach)" : "", r.modeReason ? h("div", { class: "message" }, r.modeReason) : null)
            ),
          ],
        ],
        [
          "Attached to",
          (v) => {
            const a = attachmentOf(v);
            if (!v.publication && !a) return "—";
            return [v.publication ? v.publication.nodeId : "", a ? h("div", { class: "attach-path" }, `${a.mode}: `, h("span", { class: "mono" }, a.path)) : null];
          },
        ],
        [
          "Operations",
          (v) => {
            const snap = h("button", { type: "button", "data-key": `snapshot-${v.id}` }, "Snapshot");
            snap.addEventListener("click", () => snapshotVolume(v));
            const backup = h("button", { type: "button", "data-key": `backup-${v.id}` }, "Back up");
            backup.addEventListener("click", () => backupVolume(v, backup));
            const del = h("button", { type: "button", class: "danger", "data-key": `delete-volume-${v.id}` }, "Delete");
            del.addEventListener("click", () => deleteVolume(v, del));
            // Attached (here, by the UI or the CLI; or anywhere): Detach; else Attach. Where this
            // server cannot attach, both are disabled with the reason as their title.
            const attached = attachmentOf(v) || v.publication;
            const toggle = attached
              ? h("button", { type: "button", "data-key": `detach-${v.id}`, disabled: !!attachError, title: attachError || false }, "Detach")
              : h("button", { type: "button", "data-key": `attach-${v.id}`, disabled: !!attachError, title: attachError || false }, "Attach");
            toggle.addEventListener("click", () => (attached ? detachVolume(v, toggle) : attachDialog(v)));
            return h("div", { class: "ops", "aria-label": `Operations of ${v.id}` }, toggle, snap, backup, del);
          },
        ],
      ],
      rows,
      "No volumes yet."
    ),
    attachError
      ? h("div", { class: "error attach-unavailable" }, h("span", { class: "error-text" }, `Attach and detach: ${attachError}`))
      : h("p", { class: "muted" }, "Attach mounts a volume (or puts its block device) on the machine bicsi serve runs on, under its data directory; the CLI's attachments (bicsi volume attach) show here too, and either side detaches the other's."),
    h("h3", {}, "Snapshots"),
    topicNote("snapshots"),
    table(
      "snapshots",
      "Snapshots, live",
      [
        ["Snapshot", (s) => h("strong", { class: "mono" }, s.id)],
        ["Volume", (s) => s.sourceVolumeId],
        ["Size", (s) => bytes(s.sizeBytes)],
        ["Backing image", (s) => s.backingImage || "—"],
        ["Taken", (s) => new Date(s.creationSecs * 1000).toISOString().replace(".000Z", "Z")],
        [
          "Operations",
          (s) => {
            const restore = h("button", { type: "button", "data-key": `restore-snap-${s.id}` }, "Restore");
            restore.addEventListener("click", () =>
              restoreDialog(`Restore snapshot ${s.id}`, s.backingImage, s.sizeBytes, async (volume, image) => {
                const parameters = image ? { backingImage: image } : {};
                const v = await call("POST", "/v1/volumes", { name: volume, fromSnapshot: s.id, parameters });
                return `volume ${v.id} restored from snapshot ${s.id}`;
              })
            );
            const del = h("button", { type: "button", class: "danger", "data-key": `delete-snap-${s.id}` }, "Delete");
            del.addEventListener("click", () => {
              if (!confirm(`Delete snapshot ${s.id}?`)) return;
              act(del, async () => {
                await call("DELETE", `/v1/snapshots/${encodeURIComponent(s.id)}`);
                notice(`snapshot ${s.id} deleted`);
              });
            });
            return h("div", { class: "ops" }, restore, del);
          },
        ],
      ],
      snaps,
      "No snapshots."
    ),
    h("div", { class: "bar" }, h("h3", {}, "Backups"), h("button", { type: "button", "data-key": "refresh-backups", onclick: (ev) => loadBackups(ev.currentTarget) }, "Refresh backups")),
    backupsError ? h("div", { class: "error" }, h("span", { class: "error-text" }, `backups: ${backupsError}`)) : null,
    table(
      "backups",
      "Backups in the backup target (Refresh to read it again)",
      [
        ["Backup", (b) => h("strong", { class: "mono" }, b.name)],
        ["Volume", (b) => b.volume],
        ["State", (b) => [h("span", { class: `state-${b.state}` }, b.state), ` ${b.progress}%`, b.message ? h("div", { class: "message" }, b.message) : null]],
        ["Size", (b) => bytes(b.sizeBytes)],
        ["Backing image", (b) => b.backingImage || "—"],
        ["Created", (b) => b.created],
        [
          "Operations",
          (b) => {
            const restore = h("button", { type: "button", "data-key": `restore-backup-${b.name}`, disabled: b.state !== "completed" }, "Restore");
            restore.addEventListener("click", () =>
              restoreDialog(`Restore backup ${b.name}`, b.backingImage, b.sizeBytes, async (volume, image) => {
                const body = { volume };
                if (image) body.backingImage = image;
                await call("POST", `/v1/backups/${encodeURIComponent(b.name)}/restore`, body);
                return `restore of backup ${b.name} into volume ${volume} started`;
              })
            );
            return restore;
          },
        ],
      ],
      (backups || []).map((b) => Object.assign({ __key: b.name }, b)),
      "No backups (or no backup target set: Settings › backup-target)."
    ),
  ];
}

// ------------------------------------------------------------------ settings page

function settingsPage() {
  const rows = (data.settings || []).map((s) => Object.assign({ __key: s.name }, s));
  return [
    h("div", { class: "bar" }, h("h2", {}, "Settings")),
    topicNote("settings"),
    table(
      "settings",
      "Lifecycle settings; each applies without a restart",
      [
        ["Name", (s) => h("label", { for: `setting-${s.name}`, class: "mono" }, s.name)],
        [
          "Value",
          (s) => {
            const input = h("input", { id: `setting-${s.name}`, name: s.name, value: s.value, "data-key": `setting-${s.name}`, size: 10 });
            const save = h("button", { type: "button", "data-key": `save-${s.name}` }, "Save");
            const send = () =>
              act(save, async () => {
                const r = await call("PUT", `/v1/settings/${encodeURIComponent(s.name)}`, { value: input.value.trim() });
                delete dirty[s.name];
                notice(`setting ${r.name} = ${r.value} ${r.unit}`);
              });
            save.addEventListener("click", send);
            input.addEventListener("input", () => (dirty[s.name] = input.value));
            input.addEventListener("keydown", (ev) => {
              if (ev.key === "Enter") send();
            });
            if (s.name in dirty) input.value = dirty[s.name];
            return h("span", {}, input, " ", save);
          },
        ],
        ["Unit", (s) => s.unit || "—"],
        ["Default", (s) => s.default],
        ["Description", (s) => s.description],
      ],
      rows,
      "No settings."
    ),
  ];
}

// Values typed but not saved yet, kept across the live redraws.
const dirty = {};

// ------------------------------------------------------------------ nodes and disks page

function nodesPage() {
  const nodes = (data.nodes || []).map((n) => Object.assign({ __key: n.nodeId }, n));
  const disks = (data.disks || []).map((d) => Object.assign({ __key: d.disk.id }, d));
  return [
    h("div", { class: "bar" }, h("h2", {}, "Nodes and disks")),
    topicNote("nodes"),
    table(
      "nodes",
      "Nodes, live",
      [
        ["Node", (n) => h("strong", {}, n.nodeId)],
        ["State", (n) => h("span", { class: n.up ? "state-up" : "state-down" }, n.up ? "up" : "down")],
        ["Last heartbeat", (n) => n.lastHeartbeat || "—"],
        ["Disks", (n) => (n.disks || []).length],
        ["Max volumes", (n) => n.maxVolumesPerNode || "no limit"],
      ],
      nodes,
      "No nodes registered."
    ),
    h("h3", {}, "Disks"),
    topicNote("disks"),
    table(
      "disks",
      "Disks of the up nodes, live",
      [
        ["Disk", (d) => h("span", { class: "mono" }, d.disk.id)],
        ["Node", (d) => d.disk.nodeId || d.disk.node_id || "—"],
        ["Path", (d) => h("span", { class: "mono" }, d.disk.path)],
        ["Free", (d) => bytes(d.free_bytes)],
        ["Backing image manager", (d) => (d.manager ? "running" : "not running (no files)")],
        ["Shares blocks", (d) => (d.shares_blocks ? "yes" : "no")],
      ],
      disks,
      "No disks (no node is up)."
    ),
  ];
}

// ------------------------------------------------------------------ routing and live updates

const PAGES = {
  backingimages: backingImagesPage,
  volumes: volumesPage,
  settings: settingsPage,
  nodes: nodesPage,
};

// The lists each page draws from: an event of another list does not redraw it.
const USES = {
  backingimages: ["backingimages", "volumes", "disks"],
  volumes: ["volumes", "snapshots", "backingimages"],
  settings: ["settings"],
  nodes: ["nodes", "disks"],
};

function current() {
  const name = location.hash.replace(/^#\/?/, "");
  return PAGES[name] ? name : "backingimages";
}

function render() {
  const page = current();
  const main = document.getElementById("main");
  // Redrawn rows keep the keyboard focus where it was.
  const focused = document.activeElement && main.contains(document.activeElement) ? document.activeElement.getAttribute("data-key") : null;
  main.replaceChildren(...PAGES[page]().filter(Boolean));
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  if (focused) {
    const again = main.querySelector(`[data-key="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

function start() {
  window.addEventListener("hashchange", () => {
    render();
    document.getElementById("main").focus();
  });
  render();
  const live = document.getElementById("live");
  watch(
    Object.keys(data),
    (name, value) => {
      const topic = name === "error" ? value.topic : name;
      if (name === "error") {
        topicErrors[topic] = value.error;
        if (data[topic] === null) data[topic] = [];
      } else if (name in data) {
        delete topicErrors[name];
        data[name] = value;
        // An attach or detach changes a volume's publication: read the paths again.
        if (name === "volumes" && attachments !== null) loadAttachments();
      }
      live.textContent = "live";
      live.classList.remove("down");
      if (!USES[current()].includes(topic)) return;
      // A page redraws unless the user is typing in it.
      const typing = document.activeElement && document.activeElement.tagName === "INPUT" && document.getElementById("main").contains(document.activeElement);
      if (typing) {
        clearTimeout(start.later);
        start.later = setTimeout(render, 300);
      } else render();
    },
    (state) => {
      live.textContent = state || "live";
      live.classList.toggle("down", !!state);
    }
  );
}

start();
