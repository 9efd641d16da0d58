// The client side of bicsi's HTTP API for the pages: JSON requests with the bearer token, the
// login prompt on 401, the live event stream, and uploads with progress. Errors are thrown as
// ApiError with the API's own message, for the page to show; nothing here swallows one.

const TOKEN_KEY = "bicsi-api-token";

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code || "";
  }
}

/** The token of this browser tab (sessionStorage only: gone when the tab closes). */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const t = token();
  if (t) h["Authorization"] = "Bearer " + t;
  return h;
}

// One login prompt at a time; every request that got a 401 waits for it, then tries again.
let asking = null;

/** Shows the login dialog; resolves once a token was entered. */
export function askToken(message) {
  if (asking) return asking;
  const dialog = document.getElementById("login");
  const form = dialog.querySelector("form");
  const input = dialog.querySelector("input[name=token]");
  dialog.querySelector(".login-message").textContent = message || "";
  asking = new Promise((resolve) => {
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const t = input.value.trim();
      if (!t) return;
      sessionStorage.setItem(TOKEN_KEY, t);
      input.value = "";
      dialog.close();
      asking = null;
      resolve();
    };
  });
  if (!dialog.open) dialog.showModal();
  input.focus();
  return asking;
}

/** The error of a failed answer: the API's `{"error":..}` message, else the status text. */
async function failure(resp) {
  let message = `${resp.status} ${resp.statusText}`;
  let code = "";
  const text = await resp.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    if (body && body.error) {
      message = body.error;
      code = body.code || "";
    }
  } catch {
    if (text.trim()) message += ": " + text.trim();
  }
  return new ApiError(resp.status, message, code);
}

/** fetch with the token; a 401 asks for the token and tries again. */
export async function raw(method, path, options = {}) {
  for (;;) {
    let resp;
    try {
      resp = await fetch(path, {
        method,
        headers: headers(options.headers),
        body: options.body,
        signal: options.signal,
      });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(0, `${method} ${path}: bicsi did not answer (${e.message}); is it running?`);
    }
    if (resp.status === 401) {
      const err = await failure(resp);
      forgetToken();
      await askToken(err.message);
      continue;
    }
    if (!resp.ok) throw await failure(resp);
    return resp;
  }
}

/** A JSON request; the parsed answer (null for 204). */
export async function call(method, path, body) {
  const resp = await raw(method, path, {
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 204) return null;
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

/**
 * Follows `GET /v1/events?topics=...` (server-sent events read through fetch, so the token goes
 * in a header, which EventSource cannot send). `onEvent(name, data)` for each event,
 * `onState(text)` when the connection drops or comes back; it reconnects until `stop()`.
 */
export function watch(topics, onEvent, onState) {
  let stopped = false;
  let ctrl = null;
  (async () => {
    let wait = 500;
    while (!stopped) {
      ctrl = new AbortController();
      try {
        const resp = await raw("GET", "/v1/events?topics=" + topics.join(","), {
          signal: ctrl.signal,
          headers: { Accept: "text/event-stream" },
        });
        onState("");
        wait = 500;
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, end);
            buf = buf.slice(end + 2);
            let name = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) name = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            }
            if (data.length) onEvent(name, JSON.parse(data.join("\n")));
          }
        }
        if (!stopped) onState("the live updates stopped; reconnecting…");
      } catch (e) {
        if (stopped) return;
        onState(`live updates: ${e.message}; reconnecting…`);
      }
      await new Promise((r) => setTimeout(r, wait));
      wait = Math.min(wait * 2, 5000);
    }
  })();
  return {
    stop() {
      stopped = true;
      if (ctrl) ctrl.abort();
    },
  };
}

/**
 * PUTs a Blob with upload progress (XMLHttpRequest: fetch reports no upload progress);
 * `progress(sent, total)`. Resolves with the parsed answer, rejects with ApiError.
 */
export function upload(path, blob, extraHeaders, progress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", path);
    const h = headers(Object.assign({ "Content-Type": "application/octet-stream" }, extraHeaders));
    for (const [k, v] of Object.entries(h)) xhr.setRequestHeader(k, v);
    xhr.upload.onprogress = (ev) => progress(ev.loaded, ev.lengthComputable ? ev.total : blob.size);
    xhr.onerror = () =>
      reject(new ApiError(0, `the upload to ${path} broke off (the connection dropped); bicsi marks the file failed: upload again`));
    xhr.onload = async () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        resolve(xhr.responseText ? JSON.parse(xhr.responseText) : null);
        return;
      }
      if (xhr.status === 401) forgetToken();
      let message = `${xhr.status} ${xhr.statusText}`;
      let code = "";
      try {
        const b = JSON.parse(xhr.responseText);
        if (b.error) {
          message = b.error;
          code = b.code || "";
        }
      } catch {
        /* not JSON: the status line says it */
      }
      reject(new ApiError(xhr.status, message, code));
    };
    xhr.send(blob);
  });
}
