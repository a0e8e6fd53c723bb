//! The chat page in headless Chromium, as a user uses it: load the page of a running
//! `longrun dev`, call `refine_output` from the form, see the ack, the progress bar move and the
//! result arrive as a fresh message; start another, press Cancel, see it cancelled.
//!
//! Chromium is driven over the DevTools protocol (a WebSocket; the few lines of client are
//! below). It comes from Debian's `chromium` package (`scripts/install-tools` installs it).
//! Without it the test is skipped — and fails under `CI=true`. Set `LONGRUN_SCREENSHOT=path.png`
//! to save what the page looked like at the end.

mod dev_support;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dev_support::{DevProcess, FAST_SETTINGS, TempDir, required};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one DevTools command (a page-side wait included) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

fn find_chromium() -> Option<String> {
    let candidates = std::env::var("CHROMIUM")
        .ok()
        .into_iter()
        .chain(["chromium", "chromium-browser", "google-chrome"].map(String::from));
    candidates.into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A headless Chromium; killed when dropped.
struct Browser {
    child: Child,
    _profile: TempDir,
    /// `ws://127.0.0.1:PORT/devtools/browser/…`.
    ws_url: String,
}

impl Browser {
    fn launch(binary: &str) -> Self {
        let profile = TempDir::new("chromium-profile");
        let mut child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        // Chromium names its DevTools endpoint on stderr; keep draining stderr afterwards so
        // it never blocks on a full pipe.
        let stderr = child.stderr.take().expect("stderr");
        let (found, url) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut found = Some(found);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(at) = line.find("ws://")
                    && line.contains("DevTools listening on")
                    && let Some(found) = found.take()
                {
                    let _ = found.send(line[at..].trim().to_owned());
                }
            }
        });
        let ws_url = match url.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("chromium did not open its DevTools endpoint within 30 s");
            }
        };
        Self {
            child,
            _profile: profile,
            ws_url,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools protocol connection: a minimal WebSocket client (text frames, masked as clients
/// must; pings answered) and request/response matching by id.
struct DevTools {
    stream: TcpStream,
    next_id: u64,
}

impl DevTools {
    async fn connect(ws_url: &str) -> Self {
        let rest = ws_url.strip_prefix("ws://").expect("a ws:// URL");
        let (host, path) = rest.split_once('/').expect("a path");
        let mut stream = TcpStream::connect(host).await.expect("DevTools connects");
        let request = format!(
            "GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: bG9uZ3J1bi1jaGF0LXBhZ2U=\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        // Read the handshake answer byte by byte, so no frame byte is consumed with it.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.expect("handshake"));
            assert!(head.len() < 8192, "handshake too long");
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "handshake refused: {head}"
        );
        Self { stream, next_id: 1 }
    }

    async fn send_text(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mut frame = vec![0x81u8];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n < 65_536 => {
                frame.push(0x80 | 126);
                frame.extend((n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend((n as u64).to_be_bytes());
            }
        }
        let mask = [0x4c, 0x52, 0x75, 0x6e];
        frame.extend(mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.expect("DevTools write");
    }

    async fn read_message(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            let b0 = self.stream.read_u8().await.expect("DevTools read");
            let b1 = self.stream.read_u8().await.expect("DevTools read");
            let (fin, opcode, masked) = (b0 & 0x80 != 0, b0 & 0x0f, b1 & 0x80 != 0);
            let len = match b1 & 0x7f {
                126 => u64::from(self.stream.read_u16().await.unwrap()),
                127 => self.stream.read_u64().await.unwrap(),
                n => u64::from(n),
            };
            let mut mask = [0u8; 4];
            if masked {
                self.stream.read_exact(&mut mask).await.unwrap();
            }
            let mut payload = vec![0u8; usize::try_from(len).expect("frame size")];
            self.stream.read_exact(&mut payload).await.unwrap();
            if masked {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
            }
            match opcode {
                0x0..=0x2 => {
                    message.extend(payload);
                    if fin {
                        return String::from_utf8(message).expect("UTF-8 message");
                    }
                }
                0x8 => panic!("DevTools closed the connection"),
                0x9 => {
                    // Ping: answer with a pong carrying the same payload.
                    let mut pong = vec![0x8a, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                    pong.extend(&payload);
                    self.stream.write_all(&pong).await.unwrap();
                }
                _ => {}
            }
        }
    }

    /// Sends a command (to a page when `session` is given) and returns its result.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.send_text(&command.to_string()).await;
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, async {
            loop {
                let message: Value = serde_json::from_str(&self.read_message().await).unwrap();
                if message["id"] == id {
                    return message;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{method} got no answer within {COMMAND_TIMEOUT:?}"));
        if let Some(error) = answer.get("error") {
            panic!("{method} failed: {error}");
        }
        answer["result"].clone()
    }
}

/// A page in the browser.
struct Page {
    devtools: DevTools,
    session: String,
}

impl Page {
    async fn open(browser: &Browser, url: &str, height: u32) -> Self {
        let mut devtools = DevTools::connect(&browser.ws_url).await;
        let target = devtools
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = devtools
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        let session = attached["sessionId"].as_str().unwrap().to_owned();
        let mut page = Self { devtools, session };
        page.command(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await;
        page.command("Page.navigate", json!({"url": url})).await;
        page
    }

    /// Waits until the page has loaded its tools, its task list and its event stream, then
    /// installs the test helpers.
    async fn ready(&mut self) {
        self.eval(
            "new Promise((resolve, reject) => { const t = Date.now(); const tick = () => \
             (window.longrunPage && longrunPage.ready && longrunPage.connected) ? resolve(true) \
             : Date.now() - t > 30000 ? reject(new Error('the page never got ready')) : setTimeout(tick, 25); tick(); })",
        )
        .await;
        self.eval(HELPERS).await;
    }

    async fn command(&mut self, method: &str, params: Value) -> Value {
        self.devtools
            .call(Some(&self.session), method, params)
            .await
    }

    /// Runs `script` (an expression; a promise is awaited) in the page and returns its value.
    async fn eval(&mut self, script: &str) -> Value {
        let answer = self
            .command(
                "Runtime.evaluate",
                json!({"expression": script, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        if let Some(exception) = answer.get("exceptionDetails") {
            panic!(
                "page script failed: {}",
                exception["exception"]["description"]
                    .as_str()
                    .unwrap_or(&exception.to_string())
            );
        }
        answer["result"]["value"].clone()
    }

    async fn screenshot(&mut self, path: &str) {
        let shot = self
            .command("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64_decode(shot["data"].as_str().unwrap());
        std::fs::write(path, png).expect("screenshot written");
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, c)| n | (u32::from(value(*c)) << (18 - 6 * i)));
        out.extend(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Page-side helpers: `__t.wait(fn, ms, what)` resolves with `fn()`'s first truthy value.
const HELPERS: &str = r##"
window.__t = {
  wait: (fn, ms, what) => new Promise((resolve, reject) => {
    const started = Date.now();
    const tick = () => {
      let value = null;
      try { value = fn(); } catch (_) { value = null; }
      if (value) return resolve(value);
      if (Date.now() - started > ms) return reject(new Error("timed out waiting for " + what));
      setTimeout(tick, 25);
    };
    tick();
  }),
  call: async (fn, input) => {
    const select = document.querySelector("#function");
    select.value = fn;
    select.dispatchEvent(new Event("change"));
    const field = document.querySelector("#param-input");
    field.value = input;
    field.dispatchEvent(new Event("input"));
    const before = new Set([...document.querySelectorAll('.msg[data-kind="ack"]')].map((n) => n.dataset.taskId));
    document.querySelector("#send").click();
    const ack = await __t.wait(() => [...document.querySelectorAll('.msg[data-kind="ack"]')].find((n) => !before.has(n.dataset.taskId)), 30000, "the ack");
    const calls = [...document.querySelectorAll('.msg[data-kind="call"]')];
    return { taskId: ack.dataset.taskId, ack: ack.querySelector(".summary").textContent, call: calls[calls.length - 1].innerText };
  },
};
true
"##;

/// The browser, or `None` with a `SKIPPED:` line — a failure instead under `CI=true`.
fn chromium_or_skip() -> Option<String> {
    let found = find_chromium();
    if found.is_none() {
        if required() {
            panic!(
                "chromium is required under CI=true: run scripts/install-tools (apt-get install chromium)"
            );
        }
        eprintln!("SKIPPED: chromium is not installed (scripts/install-tools installs it)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_shows_ack_progress_result_and_cancels_a_task() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    // GIVEN a dev stack whose simulated model takes 3–4 s, and the page open in Chromium
    let dev = DevProcess::start(
        "chat-page",
        &[
            "--no-demo",
            "--simulate-model",
            "--simulate-latency-ms",
            "3000..4000",
        ],
        FAST_SETTINGS,
    );
    let browser = Browser::launch(&chromium);
    let mut page = Page::open(&browser, &dev.url, 900).await;
    page.ready().await;

    // WHEN the user calls refine_output from the form
    let started = page
        .eval(r#"__t.call("refine_output", "pls make this sound better")"#)
        .await;
    // THEN their call shows, and the ack arrives at once
    assert!(
        started["call"]
            .as_str()
            .unwrap()
            .contains("pls make this sound better"),
        "{started}"
    );
    assert_eq!(
        started["ack"],
        "Started 'refine_output' in background — the result will be sent to chat when it finishes."
    );
    let task = started["taskId"].as_str().unwrap().to_owned();
    // AND the progress bar moves, then the result arrives as a fresh message
    let followed = page
        .eval(&format!(
            r#"(async () => {{
              const id = {task:?};
              const seen = [];
              const result = await __t.wait(() => {{
                const card = document.querySelector(`.task-card[data-task-id="${{id}}"]`);
                const width = card && card.querySelector(".bar-fill").style.width;
                if (width && seen[seen.length - 1] !== width) seen.push(width);
                return document.querySelector(`.msg[data-kind="result"][data-task-id="${{id}}"]`);
              }}, 60000, "the result");
              return {{ seen, text: result.innerText, ok: result.dataset.ok, classes: result.className }};
            }})()"#
        ))
        .await;
    let seen: Vec<f64> = followed["seen"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w.as_str()?.trim_end_matches('%').parse().ok())
        .collect();
    assert!(
        seen.iter().any(|w| *w > 0.0 && *w < 100.0),
        "the bar never showed progress between 0 and 100 %: {followed}"
    );
    let text = followed["text"].as_str().unwrap();
    assert!(text.contains("Refined output ready! 🎉"), "{text}");
    assert!(text.contains("(simulated answer"), "{text}");
    assert_eq!(followed["ok"], "true");

    // WHEN another task runs and the user presses its Cancel button
    let second = page
        .eval(r#"__t.call("refine_output", "this one gets cancelled")"#)
        .await;
    let second = second["taskId"].as_str().unwrap().to_owned();
    assert_ne!(second, task);
    let cancelled = page
        .eval(&format!(
            r#"(async () => {{
              const id = {second:?};
              const card = await __t.wait(() => {{
                const c = document.querySelector(`.task-card[data-task-id="${{id}}"]`);
                return c && c.dataset.state === "running" && Number(c.dataset.pct) > 0 && c;
              }}, 30000, "the task running");
              card.querySelector("button.cancel").click();
              const result = await __t.wait(() => document.querySelector(`.msg[data-kind="result"][data-task-id="${{id}}"]`), 30000, "the cancellation");
              const row = await __t.wait(() => document.querySelector(`#tasks tr[data-task-id="${{id}}"][data-state="cancelled"]`), 30000, "the task list");
              return {{ text: result.innerText, ok: result.dataset.ok, classes: result.className, card: card.dataset.state, row: row.dataset.state }};
            }})()"#
        ))
        .await;
    // THEN it ends cancelled: an error message in the chat, the card and the task list agree
    assert!(
        cancelled["text"]
            .as_str()
            .unwrap()
            .contains("'refine_output' was cancelled."),
        "{cancelled}"
    );
    assert_eq!(cancelled["ok"], "false");
    assert!(
        cancelled["classes"].as_str().unwrap().contains("error"),
        "{cancelled}"
    );
    assert_eq!(cancelled["card"], "cancelled");
    assert_eq!(cancelled["row"], "cancelled");

    if let Ok(path) = std::env::var("LONGRUN_SCREENSHOT") {
        page.screenshot(&path).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_opened_after_the_demo_shows_the_history_live_and_without_errors() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    // GIVEN a dev stack whose demo has run to the end: its background tasks are finished and
    // delivered before any page is open
    let dev = DevProcess::start(
        "chat-page-after-demo",
        &["--simulate-model", "--simulate-latency-ms", "2500..3500"],
        FAST_SETTINGS,
    );
    let http = reqwest::Client::new();
    let list = serde_json::json!({"action": "list", "ext": "text-tools", "user": "dev-user"});
    let started = std::time::Instant::now();
    loop {
        let answer: Value = http
            .post(format!("{}/api/intake", dev.url))
            .json(&list)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let tasks = answer["tasks"].as_array().cloned().unwrap_or_default();
        if tasks.len() >= 2 && tasks.iter().all(|t| !t["delivered_at"].is_null()) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(90),
            "the demo did not finish: {answer}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // WHEN the page opens on that history and the task list refreshes again and again
    let browser = Browser::launch(&chromium);
    let mut page = Page::open(&browser, &dev.url, 900).await;
    page.ready().await;
    let seen = page
        .eval(
            r##"(async () => {
              const errors = [];
              window.addEventListener("error", (e) => errors.push(String(e.message)));
              window.addEventListener("unhandledrejection", (e) => errors.push(String(e.reason)));
              for (let i = 0; i < 3; i++) {
                document.querySelector("#refresh").click();
                await new Promise((r) => setTimeout(r, 300));
              }
              const conn = document.querySelector("#conn");
              return {
                errors,
                badge: conn.textContent,
                badgeClass: conn.className,
                results: document.querySelectorAll('.msg[data-kind="result"]').length,
                rows: document.querySelectorAll("#tasks tbody tr").length,
                cancels: document.querySelectorAll(".task-card button.cancel").length,
              };
            })()"##,
        )
        .await;
    // THEN the finished tasks are there, the connection badge is live, and nothing threw
    assert_eq!(seen["errors"], serde_json::json!([]), "{seen}");
    assert_eq!(seen["badge"], "live", "{seen}");
    assert_eq!(seen["badgeClass"], "badge live", "{seen}");
    assert!(seen["results"].as_u64().unwrap() >= 2, "{seen}");
    assert!(seen["rows"].as_u64().unwrap() >= 2, "{seen}");
    assert_eq!(seen["cancels"], 0, "finished tasks offer no cancel: {seen}");

    // WHEN the user switches to another chat and another user, and back
    let switched = page
        .eval(
            r##"(async () => {
              const set = (id, value) => { const i = document.querySelector(id); i.value = value; i.dispatchEvent(new Event("change")); };
              set("#chat", "another-chat");
              await __t.wait(() => document.querySelector("#empty"), 10000, "an empty conversation");
              const otherChat = document.querySelectorAll('.msg[data-kind="result"]').length;
              set("#user", "someone-else");
              await __t.wait(() => document.querySelectorAll("#tasks tbody tr").length === 0, 10000, "an empty task list");
              set("#user", "dev-user");
              set("#chat", "dev-chat");
              await __t.wait(() => document.querySelectorAll("#tasks tbody tr").length >= 2, 10000, "dev-user's tasks");
              await __t.wait(() => document.querySelectorAll('.msg[data-kind="result"]').length >= 2, 10000, "dev-chat's results");
              return { otherChat };
            })()"##,
        )
        .await;
    // THEN each chat shows its own conversation and each user their own tasks
    assert_eq!(switched["otherChat"], 0, "{switched}");

    // WHEN a running task is cancelled from the task list (not from its card)
    let started = page
        .eval(r#"__t.call("refine_output", "cancel me from the list")"#)
        .await;
    let id = started["taskId"].as_str().unwrap().to_owned();
    let cancelled = page
        .eval(&format!(
            r#"(async () => {{
              const id = {id:?};
              const button = await __t.wait(() => document.querySelector(`#tasks tr[data-task-id="${{id}}"] button.cancel`), 30000, "the list's Cancel button");
              button.click();
              const row = await __t.wait(() => document.querySelector(`#tasks tr[data-task-id="${{id}}"][data-state="cancelled"]`), 30000, "the row cancelled");
              const result = await __t.wait(() => document.querySelector(`.msg[data-kind="result"][data-task-id="${{id}}"]`), 30000, "the cancellation");
              return {{ row: row.dataset.state, text: result.innerText, buttons: row.querySelectorAll("button").length }};
            }})()"#
        ))
        .await;
    // THEN it ends cancelled, with one message saying so and no Cancel button left
    assert_eq!(cancelled["row"], "cancelled", "{cancelled}");
    assert!(
        cancelled["text"]
            .as_str()
            .unwrap()
            .contains("'refine_output' was cancelled."),
        "{cancelled}"
    );
    assert_eq!(cancelled["buttons"], 0, "{cancelled}");

    // A screenshot of the page as the user left it, kept as a test artifact.
    let shot = longrun_tests::target_dir().join("test-artifacts/chat-page-after-demo.png");
    std::fs::create_dir_all(shot.parent().unwrap()).unwrap();
    page.screenshot(&shot.to_string_lossy()).await;
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
}

/// Makes `docs/chat-page.png`: the page after `longrun dev --simulate-model` ran the seed demo,
/// with one more task in progress. Run it by hand:
/// `LONGRUN_SCREENSHOT=docs/chat-page.png cargo test -p longrun-tests --test chat_page -- --ignored`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "makes the README screenshot; run by hand"]
async fn screenshot_after_the_demo() {
    let chromium = find_chromium().expect("chromium");
    let path = std::env::var("LONGRUN_SCREENSHOT").expect("LONGRUN_SCREENSHOT=path.png");
    let dev = DevProcess::start(
        "screenshot",
        &["--simulate-model", "--simulate-latency-ms", "2500..4000"],
        FAST_SETTINGS,
    );
    let browser = Browser::launch(&chromium);
    let mut page = Page::open(&browser, &dev.url, 1480).await;
    page.ready().await;
    // The demo's three answers: A inline, B and C as results.
    page.eval(
        r#"__t.wait(() => document.querySelectorAll('.msg[data-kind="result"]').length >= 2, 60000, "the demo")"#,
    )
    .await;
    let started = page
        .eval(r#"__t.call("refine_output", "could u pls make this update shorter, its way too long and i think nobody reads it")"#)
        .await;
    page.eval(&format!(
        r#"__t.wait(() => {{ const c = document.querySelector(`.task-card[data-task-id="${{{id:?}}}"]`); return c && Number(c.dataset.pct) >= 40; }}, 30000, "progress")"#,
        id = started["taskId"].as_str().unwrap()
    ))
    .await;
    page.screenshot(&path).await;
}
