//! The chat page in headless Chromium, as a user uses it: load the page of a running
//! `longrun dev`, call `refine_output` from the form, see the ack, the progress bar move and the
//! result arrive as a fresh message; start another, press Cancel, see it cancelled; see a
//! stall notice, a cancelled document's partial result and a budget refusal. In every
//! test the page must throw nothing — no uncaught exception, no unhandled rejection — from the
//! moment it starts to load.
//!
//! Chromium is driven by the `chromiumoxide` crate (the DevTools protocol over its own
//! WebSocket). It comes from Debian's `chromium` package (`scripts/install-tools` installs it).
//! Without it the test is skipped — and fails under `CI=true`. Set `LONGRUN_SCREENSHOT=path.png`
//! to save what the page looked like at the end.

mod dev_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use chromiumoxide::cdp::js_protocol::runtime::{EventExceptionThrown, ExceptionDetails};
use chromiumoxide::error::CdpError;
use chromiumoxide::handler::viewport::Viewport;
use chromiumoxide::listeners::EventStream;
use chromiumoxide::page::ScreenshotParams;
use chromiumoxide::{Browser, BrowserConfig};
use dev_support::{DevProcess, FAST_SETTINGS, TempDir, required};
use futures::{FutureExt, StreamExt};
use serde_json::Value;

/// How long one DevTools command (a page-side wait included) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(90);

/// `$CHROMIUM`, or the first of the usual names on `PATH`, that runs; as a path, which
/// chromiumoxide wants.
fn find_chromium() -> Option<PathBuf> {
    let dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    let on_path = |name: &str| dirs.iter().map(|dir| dir.join(name)).collect::<Vec<_>>();
    let given = std::env::var_os("CHROMIUM").map(PathBuf::from);
    given
        .into_iter()
        .chain(
            ["chromium", "chromium-browser", "google-chrome"]
                .iter()
                .flat_map(|n| on_path(n)),
        )
        .find(|path| {
            path.is_file()
                && Command::new(path)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        })
}

/// A page open in a headless Chromium of its own. Dropping it kills the browser (chromiumoxide
/// starts it so); [`Page::finish`] closes it after checking the page threw nothing.
struct Page {
    browser: Browser,
    page: chromiumoxide::Page,
    /// What the page threw and nothing caught, since before it loaded.
    exceptions: EventStream<EventExceptionThrown>,
    /// chromiumoxide's event loop.
    handler: tokio::task::JoinHandle<()>,
    _profile: TempDir,
}

impl Page {
    /// Starts `chromium` with a `1280 × height` window and opens `url`.
    async fn open(chromium: &Path, url: &str, height: u32) -> Self {
        let profile = TempDir::new("chromium-profile");
        let config = BrowserConfig::builder()
            .chrome_executable(chromium)
            .no_sandbox()
            .args(["disable-gpu", "disable-quic", "disable-component-update"])
            .user_data_dir(profile.path())
            .window_size(1280, height)
            .viewport(Viewport {
                width: 1280,
                height,
                device_scale_factor: Some(1.0),
                ..Viewport::default()
            })
            .launch_timeout(Duration::from_secs(30))
            .request_timeout(COMMAND_TIMEOUT)
            .build()
            .expect("a browser configuration");
        let (browser, mut handler) = Browser::launch(config).await.expect("chromium starts");
        let handler =
            tokio::spawn(async move { while handler.next().await.is_some_and(|r| r.is_ok()) {} });
        let page = browser.new_page("about:blank").await.expect("a new page");
        // Listening before the navigation, so what the page throws while it loads counts too.
        let exceptions = page
            .event_listener::<EventExceptionThrown>()
            .await
            .expect("Runtime.exceptionThrown listener");
        page.goto(url).await.expect("the chat page loads");
        Self {
            browser,
            page,
            exceptions,
            handler,
            _profile: profile,
        }
    }

    /// Waits until the page has loaded its tools, its task list and its event stream, then
    /// installs the test helpers.
    async fn ready(&self) {
        self.eval(
            "new Promise((resolve, reject) => { const t = Date.now(); const tick = () => \
             (window.longrunPage && longrunPage.ready && longrunPage.connected) ? resolve(true) \
             : Date.now() - t > 30000 ? reject(new Error('the page never got ready')) : setTimeout(tick, 25); tick(); })",
        )
        .await;
        self.eval(HELPERS).await;
    }

    /// Runs `script` (an expression; a promise is awaited) in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        match self.page.evaluate_expression(script).await {
            Ok(result) => result.value().cloned().unwrap_or(Value::Null),
            Err(CdpError::JavascriptException(details)) => {
                panic!("page script failed: {}", describe(&details))
            }
            Err(e) => panic!("page script got no answer: {e}"),
        }
    }

    /// What the page threw and nothing caught so far (uncaught exceptions and unhandled
    /// rejections).
    async fn errors(&mut self) -> Vec<String> {
        // A round trip first: whatever Chromium reported before its answer is then delivered.
        self.eval("true").await;
        let mut errors = Vec::new();
        while let Some(Some(thrown)) = self.exceptions.next().now_or_never() {
            errors.push(describe(&thrown.exception_details));
        }
        errors
    }

    async fn screenshot(&self, path: &Path) {
        self.page
            .save_screenshot(ScreenshotParams::default(), path)
            .await
            .expect("screenshot written");
    }

    /// The end of a test: asserts that the page threw nothing since it began to load, then
    /// closes the browser.
    async fn finish(mut self) {
        let errors = self.errors().await;
        assert!(errors.is_empty(), "the page threw: {errors:#?}");
        self.browser.close().await.expect("chromium closes");
        self.browser.wait().await.expect("chromium exits");
        let _ = self.handler.await;
    }
}

/// An exception as the console shows it: its description (message and stack), else its text.
fn describe(details: &ExceptionDetails) -> String {
    details
        .exception
        .as_ref()
        .and_then(|e| e.description.clone())
        .unwrap_or_else(|| details.text.clone())
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
fn chromium_or_skip() -> Option<PathBuf> {
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
    let page = Page::open(&chromium, &dev.url, 900).await;
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
        page.screenshot(Path::new(&path)).await;
    }
    page.finish().await;
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
    let mut page = Page::open(&chromium, &dev.url, 900).await;
    page.ready().await;
    let seen = page
        .eval(
            r##"(async () => {
              for (let i = 0; i < 3; i++) {
                document.querySelector("#refresh").click();
                await new Promise((r) => setTimeout(r, 300));
              }
              const conn = document.querySelector("#conn");
              return {
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
    assert_eq!(page.errors().await, Vec::<String>::new(), "{seen}");
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
    page.screenshot(&shot).await;
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
    page.finish().await;
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
    let page = Page::open(&chromium, &dev.url, 1480).await;
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
    page.screenshot(Path::new(&path)).await;
    page.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chat_page_shows_a_stall_notice_a_partial_result_and_a_budget_refusal() {
    let Some(chromium) = chromium_or_skip() else {
        return;
    };
    // GIVEN a dev stack whose simulated model takes 2–2.5 s a call, a 1 s stall period and a
    // daily budget of 2000 AI tokens (the simulator reports 2 × words + 16 a call)
    let mut env = FAST_SETTINGS.to_vec();
    env.extend([
        ("LONGRUN_STALL_MS", "1000"),
        ("TEXT_TOOLS_DAILY_AI_TOKENS", "2000"),
    ]);
    let dev = DevProcess::start(
        "chat-page-notices",
        &[
            "--no-demo",
            "--simulate-model",
            "--simulate-latency-ms",
            "2000..2500",
        ],
        &env,
    );
    let page = Page::open(&chromium, &dev.url, 900).await;
    page.ready().await;
    let seen = page
        .eval(
            r##"(async () => {
              const call = async (fn, param, value) => {
                const select = document.querySelector("#function");
                select.value = fn;
                select.dispatchEvent(new Event("change"));
                const field = await __t.wait(() => document.querySelector("#param-" + param), 5000, "the " + param + " field");
                field.value = value;
                field.dispatchEvent(new Event("input"));
                const acks = () => [...document.querySelectorAll('.msg[data-kind="ack"], .msg[data-kind="refused"]')];
                const before = new Set(acks());
                document.querySelector("#send").click();
                return await __t.wait(() => acks().find((n) => !before.has(n)), 30000, "the answer to " + fn);
              };
              const cardOf = (id) => document.querySelector(`.task-card[data-task-id="${id}"]`);
              const resultOf = (id) => document.querySelector(`.msg[data-kind="result"][data-task-id="${id}"]`);
              // A task silent in its AI call past the stall period
              const slow = (await call("refine_output", "input", "stall please")).dataset.taskId;
              const notice = await __t.wait(() => { const c = cardOf(slow); return c && /Still working on it/.test(c.innerText) && c.innerText; }, 30000, "the stall notice");
              await __t.wait(() => resultOf(slow), 30000, "the slow task's result");
              // A three-chunk document cancelled after its first chunk
              const para = (i) => `part-${i} ` + "words ".repeat(400);
              const doc = (await call("refine_document", "document", [0, 1, 2].map(para).join("\n\n"))).dataset.taskId;
              const card = await __t.wait(() => { const c = cardOf(doc); return c && Number(c.dataset.pct) >= 30 && c; }, 60000, "the first chunk");
              card.querySelector("button.cancel").click();
              const partial = (await __t.wait(() => resultOf(doc), 30000, "the cancellation")).innerText;
              // A call that spends past the budget, then one refused
              const big = (await call("refine_output", "input", "many ".repeat(700))).dataset.taskId;
              const spent = (await __t.wait(() => resultOf(big), 30000, "the big task's result")).innerText;
              const refused = await call("refine_output", "input", "one more");
              return { notice, partial, spent, refused: refused.innerText, kind: refused.dataset.kind };
            })()"##,
        )
        .await;
    // THEN the stalled task's card showed the notice
    assert!(
        seen["notice"]
            .as_str()
            .unwrap()
            .contains("Still working on it… (running for"),
        "{seen}"
    );
    // AND the cancelled document's result shows the chunk refined before the cancel
    let partial = seen["partial"].as_str().unwrap().to_lowercase();
    assert!(
        partial.contains("'refine_document' was cancelled.")
            && partial.contains("done before it stopped (1 of 3):")
            && partial.contains("part-0"),
        "{seen}"
    );
    assert!(!partial.contains("part-1"), "{seen}");
    // AND the call that passed the budget says so, and the next is refused with the same words
    let budget = "Your daily budget of 2000 AI tokens is used up; it renews at 00:00 UTC.";
    assert!(seen["spent"].as_str().unwrap().contains(budget), "{seen}");
    assert_eq!(seen["kind"], "refused", "{seen}");
    assert!(
        seen["refused"].as_str().unwrap().contains("(429)")
            && seen["refused"].as_str().unwrap().contains(budget),
        "{seen}"
    );
    page.finish().await;
}
