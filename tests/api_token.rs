//! `bicsi serve --api-token-file`: the real binary's HTTP API refuses requests without the
//! token (401, with what to send) except /healthz, and the CLI gets through with `--token` or
//! `BICSI_TOKEN`.

#[path = "kit/mod.rs"]
mod kit;

use std::process::Output;

use kit::{Proc, bicsi as bicsi_command, free_port, serve_args, temp_dir};

/// `bicsi serve` with a token file; killed before its directory (`_dir`, the last field) goes.
struct Served {
    _proc: Proc,
    server: String,
    _dir: tempfile::TempDir,
}

fn serve(token: &str) -> Served {
    let dir = temp_dir("bicsi-token-");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let server = format!("http://127.0.0.1:{}", free_port());
    let mut args = serve_args(
        dir.path(),
        "token-node",
        server.trim_start_matches("http://"),
    );
    args.extend(["--api-token-file".into(), token_file.display().to_string()]);
    let mut proc = Proc::spawn(args, dir.path().join("bicsi.log"));
    let healthz = format!("{server}/healthz");
    proc.wait_ready_blocking("bicsi", || http_status(&healthz, None) == Some(200));
    Served {
        _proc: proc,
        server,
        _dir: dir,
    }
}

/// GET with an optional bearer token over a plain TCP connection; the status code.
fn http_status(url: &str, token: Option<&str>) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut conn = std::net::TcpStream::connect(host).ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        conn,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

fn bicsi(args: &[&str], env_token: Option<&str>) -> Output {
    let mut c = bicsi_command();
    c.args(args).env_remove("BICSI_TOKEN");
    if let Some(t) = env_token {
        c.env("BICSI_TOKEN", t);
    }
    c.output().unwrap()
}

#[test]
fn http_api_requires_the_token_except_healthz() {
    let s = serve("tok-123");
    assert_eq!(
        http_status(&format!("{}/healthz", s.server), None),
        Some(200)
    );
    // The web UI's files are open (the page must load to ask for the token); its data is not.
    for path in ["", "index.html", "ui/app.js", "ui/api.js", "ui/style.css"] {
        let url = format!("{}/{path}", s.server);
        assert_eq!(http_status(&url, None), Some(200), "{path}");
    }
    assert_eq!(
        http_status(&format!("{}/ui/nope.js", s.server), None),
        Some(401)
    );
    // The live stream too (not read with the token here: it never ends).
    let events = format!("{}/v1/events", s.server);
    assert_eq!(http_status(&events, None), Some(401));
    assert_eq!(http_status(&events, Some("nope")), Some(401));
    for path in [
        "v1/backingimages",
        "v1/storageclasses",
        "v1/volumes",
        "v1/attachments",
    ] {
        let url = format!("{}/{path}", s.server);
        assert_eq!(http_status(&url, None), Some(401), "{path}");
        assert_eq!(http_status(&url, Some("nope")), Some(401), "{path}");
        assert_eq!(http_status(&url, Some("tok-123")), Some(200), "{path}");
    }
}

#[test]
fn cli_sends_the_token_from_the_flag_or_the_environment() {
    let s = serve("tok-456");
    let get = ["get", "backingimages", "--server", &s.server];
    let refused = bicsi(&get, None);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("requires a token") && err.contains("BICSI_TOKEN"),
        "{err}"
    );
    let wrong = bicsi(&[&get[..], &["--token", "bad"]].concat(), None);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("token is wrong"));
    let by_flag = bicsi(&[&get[..], &["--token", "tok-456"]].concat(), None);
    assert!(
        by_flag.status.success(),
        "{}",
        String::from_utf8_lossy(&by_flag.stderr)
    );
    // Before the command, as scripts wrote it when --token was global: still sent, and it wins
    // over the environment.
    let before = bicsi(
        &[&["--token", "tok-456"][..], &get[..]].concat(),
        Some("bad"),
    );
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    let by_env = bicsi(&get, Some("tok-456"));
    assert!(
        by_env.status.success(),
        "{}",
        String::from_utf8_lossy(&by_env.stderr)
    );
}

#[test]
fn an_empty_token_file_stops_the_server_with_a_clear_error() {
    let dir = temp_dir("bicsi-token-");
    let f = dir.path().join("token");
    std::fs::write(&f, "\n").unwrap();
    let out = bicsi_command()
        .args(["serve", "--node-id", "n", "--http-listen", "127.0.0.1:0"])
        .arg("--api-token-file")
        .arg(&f)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
}
