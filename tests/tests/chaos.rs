//! The chaos soak (issue 13, item 14): a few hundred calls of every pattern of the reference
//! extension through the real binaries, while the harness SIGKILLs worker and delivery
//! instances at random moments, delivers work and delivery messages twice or three times and
//! reorders their batches, and has the chat API answer 500, 429 or hang, or accept a message
//! and answer late. Then, with the faults healed, every task must end terminal with exactly one
//! result message in its own chat and one `delivered` audit item, and no dead-letter queue may
//! hold anything the sweeper could still have delivered.
//!
//! Every random choice — the calls, their users and chats, their AI latencies, the faults and
//! when they strike — comes from one seed, printed at the start: `LONGRUN_CHAOS_SEED=N` replays
//! the same plan and the same fault schedule (the machine's timing still varies).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use longrun::task::{AuditKind, TaskState};
use longrun_tests::e2e::{Options, Stack};
use longrun_tests::esm::Faults;
use longrun_tests::fake_openai::completion_for;
use longrun_tests::watch::Invoked;
use serde_json::{Value, json};

/// The seed when `LONGRUN_CHAOS_SEED` is not set.
const DEFAULT_SEED: u64 = 20_260_914;
/// Calls of a background function or job: tasks.
const TASKS: usize = 240;
/// Calls answered inline (Pattern A, Pattern C's fast path), interleaved with the tasks.
const INLINE_CALLS: usize = 40;
/// Users the calls are spread over, each with two chats.
const USERS: usize = 24;
/// What marks the AI input of a task (run by a worker), and only of a task.
const TASK_MARK: &str = "bg#";
/// At most this many instances are killed, each kind.
const MAX_WORKER_KILLS: usize = 14;
const MAX_DELIVERY_KILLS: usize = 10;
/// How long the chaos goes on after the last call was acknowledged.
const CHAOS_AFTER_SUBMIT: Duration = Duration::from_secs(15);
/// The chaos lasts at most this long.
const STORM: Duration = Duration::from_secs(60);
/// `LONGRUN_QUEUE_GRACE_MS`: when the sweeper first re-sends the result of a finished task
/// that is not delivered yet. Longer than the storm, so that re-send meets a healthy chat
/// API: the one after it comes only `longrun::sweeper::REDELIVER_EVERY` (15 min, not a
/// setting) later, past the end of any test.
const QUEUE_GRACE: Duration = Duration::from_secs(75);
const _: () = assert!(QUEUE_GRACE.as_secs() > STORM.as_secs());
/// How long the chat API's one outage lasts: past delivery's five receives (2 s apart
/// here), so what it catches is dead-lettered, and the sweeper must deliver it.
const OUTAGE: Duration = Duration::from_secs(14);
/// A generous bound on the pipeline catching up once the faults are healed.
const DRAIN: Duration = Duration::from_secs(150);

/// SplitMix64: a tiny deterministic generator, so a seed replays the run's choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent` / 100.
    fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// An independent generator for another part of the run.
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

/// What a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Pattern {
    /// `refine` (A) or `start_refinement` with `fast_path` (C, fast): answered inline.
    Inline,
    /// `refine_output` (B): the whole handler in the background.
    Background,
    /// `start_refinement` (C, slow): the `refine_job` job in the background.
    Job,
    /// `refine_document`: a long-running task in checkpointed steps.
    Steps,
}

/// One planned call.
#[derive(Debug, Clone)]
struct Call {
    index: usize,
    pattern: Pattern,
    user: String,
    chat: String,
    function: &'static str,
    params: Value,
    /// The AI inputs it causes, directives included (one per chunk for `Steps`).
    inputs: Vec<String>,
    /// Whether the AI is told to fail it (the handler turns that into an error result).
    ai_fails: bool,
}

/// A call intake acknowledged with a task.
#[derive(Debug, Clone)]
struct Started {
    call: Call,
    task_id: String,
    acked: Instant,
}

/// Plans every call from the seed: pattern, user, chat, AI latency and the odd AI failure.
fn plan(rng: &mut Rng) -> Vec<Call> {
    let total = TASKS + INLINE_CALLS;
    let mut inline_left = INLINE_CALLS;
    let mut calls = Vec::with_capacity(total);
    for index in 0..total {
        let remaining = (total - index) as u64;
        let inline = inline_left > 0 && rng.below(remaining) < inline_left as u64;
        let user = format!("chaos-user-{}", rng.below(USERS as u64));
        let chat = format!("chat-{user}-{}", rng.below(2));
        let delay = rng.between(200, 2500);
        let ai_fails = !inline && rng.percent(4);
        let failure = if ai_fails { " [[status=503]]" } else { "" };
        let call = if inline {
            inline_left -= 1;
            let input = format!("chaos call {index} inline# [[delay={}]]", delay / 5);
            let (function, params) = if rng.percent(50) {
                ("refine", json!({"input": input}))
            } else {
                (
                    "start_refinement",
                    json!({"input": input, "fast_path": true}),
                )
            };
            Call {
                index,
                pattern: Pattern::Inline,
                user,
                chat,
                function,
                params,
                inputs: vec![input],
                ai_fails: false,
            }
        } else {
            match rng.below(100) {
                0..50 => {
                    let input =
                        format!("chaos task {index} {TASK_MARK} [[delay={delay}]]{failure}");
                    Call {
                        index,
                        pattern: Pattern::Background,
                        user,
                        chat,
                        function: "refine_output",
                        params: json!({"input": input}),
                        inputs: vec![input],
                        ai_fails,
                    }
                }
                50..80 => {
                    let input = format!("chaos job {index} {TASK_MARK} [[delay={delay}]]{failure}");
                    Call {
                        index,
                        pattern: Pattern::Job,
                        user,
                        chat,
                        function: "start_refinement",
                        params: json!({"input": input}),
                        inputs: vec![input],
                        ai_fails,
                    }
                }
                _ => {
                    // Each paragraph is too long to share a 4000-character chunk with the
                    // next, so each is one step with its own AI call.
                    let chunks = rng.between(2, 3) as usize;
                    let inputs: Vec<String> = (0..chunks)
                        .map(|k| {
                            format!(
                                "chaos doc {index} chunk {k} {TASK_MARK} [[delay={}]]{failure} {}",
                                rng.between(200, 1500),
                                "words ".repeat(400)
                            )
                        })
                        .collect();
                    Call {
                        index,
                        pattern: Pattern::Steps,
                        user,
                        chat,
                        function: "refine_document",
                        params: json!({"document": inputs.join("\n\n")}),
                        inputs,
                        ai_fails,
                    }
                }
            }
        };
        calls.push(call);
    }
    calls
}

/// What the chaos did.
#[derive(Debug, Default)]
struct Chaos {
    worker_kills: AtomicUsize,
    delivery_kills: AtomicUsize,
    fault_switches: AtomicUsize,
    outages: AtomicUsize,
}

/// Calls intake through the Invoke API, retrying with the same `request_id` when the
/// invocation got no answer (a retried call returns the same task, never a second one).
async fn call(stack: &Stack, call: &Call, intake_retries: &AtomicUsize) -> (Value, Instant) {
    let event = json!({"action": "call", "ext": stack.options.ext, "user": call.user,
        "chat": call.chat, "request_id": format!("chaos-{}", call.index),
        "function": call.function, "params": call.params});
    for _ in 0..5 {
        match stack
            .watch
            .invoke_json("intake", &event, Duration::from_secs(30))
            .await
        {
            Invoked::Answer(body) => {
                let answer = serde_json::from_str(&body)
                    .unwrap_or_else(|e| panic!("intake answered non-JSON {body:?}: {e}"));
                return (answer, Instant::now());
            }
            other => {
                eprintln!("intake got no answer for call {}: {other:?}", call.index);
                intake_retries.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
    panic!("intake never answered call {}", call.index)
}

/// Strikes at random for [`CHAOS_AFTER_SUBMIT`] after `submitted` is set, or until the
/// [`STORM`] is over; returns how long it went on. Kills a worker inside an AI call or a
/// delivery inside a chat post, scripts the chat API's next answers, switches the player's
/// faults — and once takes the chat API down for longer than a message's five receives, so
/// what it catches is dead-lettered and left to the sweeper.
async fn wreak(stack: &Stack, mut rng: Rng, submitted: &AtomicBool, chaos: &Chaos) -> Duration {
    let outage_at = rng.between(40, 80);
    let mut outage_ends = None;
    let mut tick = 0;
    let began = Instant::now();
    let mut calm_at = began + STORM;
    let mut calming = false;
    while Instant::now() < calm_at {
        if !calming && submitted.load(Ordering::SeqCst) {
            calming = true;
            calm_at = calm_at.min(Instant::now() + CHAOS_AFTER_SUBMIT);
        }
        tokio::time::sleep(Duration::from_millis(rng.between(100, 600))).await;
        tick += 1;
        if tick == outage_at {
            stack.chat.go_down();
            outage_ends = Some(Instant::now() + OUTAGE);
            eprintln!("chaos: chat API down for {OUTAGE:?}");
        }
        if outage_ends.is_some_and(|end| Instant::now() >= end) {
            stack.chat.heal();
            outage_ends = None;
            chaos.outages.fetch_add(1, Ordering::SeqCst);
        }
        let pick = rng.next();
        let choose = |n: usize| (pick % n as u64) as usize;
        match rng.below(100) {
            0..20 => {
                if chaos.worker_kills.load(Ordering::SeqCst) < MAX_WORKER_KILLS
                    && let Some(pid) = stack.kill_worker_in_ai_call(TASK_MARK, choose)
                {
                    chaos.worker_kills.fetch_add(1, Ordering::SeqCst);
                    eprintln!("chaos: killed worker instance {pid}");
                }
            }
            20..34 => {
                if chaos.delivery_kills.load(Ordering::SeqCst) < MAX_DELIVERY_KILLS
                    && let Some(pid) = stack.kill_delivery_in_chat_post(choose)
                {
                    chaos.delivery_kills.fetch_add(1, Ordering::SeqCst);
                    eprintln!("chaos: killed delivery instance {pid}");
                }
            }
            34..46 => stack.chat.fail_next(rng.between(1, 3) as usize),
            46..56 => {
                // At most 2 s is waited out inline; longer is left to the queue's redelivery.
                let after = if rng.percent(70) { 1 } else { 3 };
                stack
                    .chat
                    .throttle_next(rng.between(1, 3) as usize, Duration::from_secs(after));
            }
            56..62 => {
                // Past the adapter's 10 s timeout, or answered 503 after a while.
                let hang = if rng.percent(30) { 11_000 } else { 2_500 };
                stack
                    .chat
                    .hang_next(rng.between(1, 2) as usize, Duration::from_millis(hang));
            }
            62..72 => stack
                .chat
                .answer_late_next(rng.between(1, 3) as usize, Duration::from_millis(1500)),
            72..86 => {
                let function = if rng.percent(50) {
                    "worker"
                } else {
                    "delivery"
                };
                let faults = Faults {
                    copies: rng.below(3) as usize,
                    reorder: rng.percent(50),
                    ..Faults::default()
                };
                stack.esm.set_faults(function, faults);
                chaos.fault_switches.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
    // The storm is over: the chat API is healthy and messages arrive once, in order.
    stack.chat.heal();
    for function in ["worker", "delivery"] {
        stack.esm.set_faults(function, Faults::default());
    }
    began.elapsed()
}

/// The task ids of every message body in the dead-letter queue named `name`, read without
/// deleting them.
async fn dead_letters(stack: &Stack, name: &str) -> Vec<Value> {
    let url = &stack.config[name];
    let mut seen = HashSet::new();
    let mut bodies = Vec::new();
    loop {
        let messages = longrun_aws::sqs::receive(&stack.sqs, url, 10, 0, Some(60))
            .await
            .expect("receive from the dead-letter queue");
        if messages.is_empty() {
            return bodies;
        }
        for message in messages {
            if seen.insert(message.message_id.clone()) {
                bodies.push(serde_json::from_str(&message.body).unwrap_or(Value::Null));
            }
        }
    }
}

/// What the chat API answered about one task, in order: each idempotency key (without the
/// task id), the status, and when it arrived and was answered, in ms after the first.
fn story(stack: &Stack, task_id: &str) -> String {
    let answered = stack.chat.answered(task_id);
    let Some(first) = answered.iter().map(|a| a.received_at).min() else {
        return "no requests".to_owned();
    };
    answered
        .iter()
        .map(|a| {
            format!(
                "{} {} @{}–{} ms",
                a.idempotency_key.trim_start_matches(task_id),
                a.status,
                (a.received_at - first).as_millis(),
                (a.answered_at - first).as_millis()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_hundred_calls_under_chaos_each_end_with_one_result_in_their_chat() {
    let seed = std::env::var("LONGRUN_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(DEFAULT_SEED);
    let replay = format!(
        "replay with LONGRUN_CHAOS_SEED={seed} cargo test -p longrun-tests --test chaos -- --nocapture"
    );
    eprintln!("chaos soak: seed {seed} ({replay})");
    let began = Instant::now();
    let mut rng = Rng(seed);
    let calls = plan(&mut rng);
    let chaos_rng = rng.fork();
    let mut pause_rng = rng.fork();

    let mut options = Options::new("chaos")
        // A killed worker's task is swept back within seconds; a live one beats every second.
        .setting("LONGRUN_LEASE_MS", 3_000)
        .setting("LONGRUN_HEARTBEAT_MS", 1_000)
        .setting("LONGRUN_PROGRESS_INTERVAL_MS", 1_000)
        .setting("LONGRUN_QUEUE_GRACE_MS", QUEUE_GRACE.as_millis())
        .setting("LONGRUN_CAP_S", 90)
        // A batch of ten shares an instance, so one kill costs ten tasks an attempt.
        .setting("LONGRUN_MAX_ATTEMPTS", 4)
        .setting("LONGRUN_MAX_ACTIVE_TASKS", 1_000);
    // A killed instance keeps its place in the emulator's pool: one spare for each kill.
    options.spare_instances = MAX_WORKER_KILLS + MAX_DELIVERY_KILLS;
    options.work_visibility_s = 15;
    let Some(stack) = Stack::start(options).await else {
        return;
    };
    let users: BTreeSet<&str> = calls.iter().map(|c| c.user.as_str()).collect();
    futures::future::join_all(users.iter().map(|u| stack.connect_openai_key(u))).await;
    let ready = began.elapsed();

    // WHEN the calls arrive in small concurrent waves while the chaos strikes
    let submitted = AtomicBool::new(false);
    let chaos = Chaos::default();
    let intake_retries = AtomicUsize::new(0);
    let submit = async {
        let mut started = Vec::new();
        let mut inline = Vec::new();
        for wave in calls.chunks(6) {
            let answers =
                futures::future::join_all(wave.iter().map(|c| call(&stack, c, &intake_retries)))
                    .await;
            for (c, (answer, acked)) in wave.iter().zip(answers) {
                assert_eq!(
                    answer["status"], 200,
                    "call {}: {answer} ({replay})",
                    c.index
                );
                if c.pattern == Pattern::Inline {
                    inline.push((c.clone(), answer));
                } else {
                    let task_id = answer["result"]["data"]["task_id"]
                        .as_str()
                        .unwrap_or_else(|| {
                            panic!("no task id for call {}: {answer} ({replay})", c.index)
                        })
                        .to_owned();
                    started.push(Started {
                        call: c.clone(),
                        task_id,
                        acked,
                    });
                }
            }
            tokio::time::sleep(Duration::from_millis(pause_rng.between(0, 900))).await;
        }
        submitted.store(true, Ordering::SeqCst);
        (started, inline)
    };
    let (storm, (started, inline)) =
        tokio::join!(wreak(&stack, chaos_rng, &submitted, &chaos), submit);

    // THEN, once healed, every task is delivered
    let mut pending: Vec<&Started> = started.iter().collect();
    let deadline = Instant::now() + DRAIN;
    while !pending.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for s in pending {
            if stack.task(&s.task_id).await.delivered_at.is_none() {
                still.push(s);
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let mut violations: Vec<String> = pending
        .iter()
        .map(|s| format!("task {} (call {}) never delivered", s.task_id, s.call.index))
        .collect();
    // Let the last copies and re-sends land before counting.
    let quiet = tokio::time::timeout(Duration::from_secs(60), stack.wait_quiet(DRAIN)).await;
    if quiet.is_err() {
        violations.push("the queues did not drain".to_owned());
    }

    // Each task: terminal, one result in its own chat, one `delivered` audit item, and no
    // end but success without a critical audit item.
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    let mut patterns: BTreeMap<String, usize> = BTreeMap::new();
    let mut reclaimed = 0;
    let mut undeliverable = 0;
    let mut late_progress = Vec::new();
    let mut backwards_progress = Vec::new();
    let mut slowest = (Duration::ZERO, String::new());
    for s in &started {
        let id = &s.task_id;
        let task = stack.task(id).await;
        *states.entry(task.state.to_string()).or_default() += 1;
        *patterns.entry(format!("{:?}", s.call.pattern)).or_default() += 1;
        if !task.state.is_terminal() {
            violations.push(format!("task {id} is {}", task.state));
        }
        let posts = stack.chat.for_task(id);
        let results: Vec<_> = posts.iter().filter(|p| p.kind() == "result").collect();
        if results.len() != 1 {
            violations.push(format!("task {id}: {} result messages", results.len()));
        }
        // Progress is best effort, but never after the result, and never backwards.
        if posts
            .iter()
            .skip_while(|p| p.kind() != "result")
            .any(|p| p.kind() == "progress")
        {
            late_progress.push(format!("{id}: {}", story(&stack, id)));
        }
        let pcts = stack.chat.progress_for(id);
        if pcts.windows(2).any(|w| w[0] > w[1]) {
            backwards_progress.push(format!("{id} {pcts:?}"));
        }
        if let Some(p) = posts.iter().find(|p| p.chat != s.call.chat) {
            violations.push(format!(
                "task {id} of {}: a message in {}",
                s.call.chat, p.chat
            ));
        }
        if let Some(result) = results.first() {
            let waited = result.received_at.saturating_duration_since(s.acked);
            if waited > slowest.0 {
                slowest = (waited, id.clone());
            }
            let expected_ok = task.state == TaskState::Succeeded && !s.call.ai_fails;
            if result.body["result"]["ok"] != expected_ok {
                violations.push(format!(
                    "task {id} ({:?}, {}): result {}",
                    s.call.pattern, task.state, result.body["result"]
                ));
            } else if expected_ok && s.call.pattern != Pattern::Steps {
                let text = &result.body["result"]["data"]["text"];
                if text != &json!(completion_for(&s.call.inputs[0])) {
                    violations.push(format!("task {id}: wrong text {text}"));
                }
            }
            if result.body["user"] != s.call.user.as_str() {
                violations.push(format!(
                    "task {id}: result for user {}",
                    result.body["user"]
                ));
            }
        }
        let audit = stack.audit(id).await;
        let delivered = audit
            .iter()
            .filter(|a| a.kind == AuditKind::Delivered && a.audit_id == "delivered#result")
            .count();
        if delivered != 1 {
            violations.push(format!(
                "task {id}: {delivered} delivered#result audit items"
            ));
        }
        let critical = audit.iter().filter(|a| a.kind == AuditKind::Critical);
        if task.state != TaskState::Succeeded
            && !critical
                .clone()
                .any(|a| !a.audit_id.starts_with("critical#undeliverable"))
        {
            violations.push(format!(
                "task {id} ended {} without a critical audit item",
                task.state
            ));
        }
        undeliverable += critical
            .filter(|a| {
                a.audit_id.starts_with("critical#undeliverable") && a.audit_id.ends_with(":result")
            })
            .count();
        reclaimed += audit
            .iter()
            .filter(|a| a.kind == AuditKind::Reclaimed)
            .count();
    }
    violations.extend(
        late_progress
            .iter()
            .map(|story| format!("progress after the result: {story}")),
    );
    violations.extend(
        backwards_progress
            .iter()
            .map(|pcts| format!("progress going backwards: {pcts}")),
    );
    // Inline calls answer in the call, reach no chat, and start no task.
    let task_ids: HashSet<&str> = started.iter().map(|s| s.task_id.as_str()).collect();
    for (c, answer) in &inline {
        if answer["result"]["ok"] != true
            || answer["result"]["data"]["text"] != json!(completion_for(&c.inputs[0]))
        {
            violations.push(format!("inline call {}: {answer}", c.index));
        }
    }
    for post in stack.chat.messages() {
        if !task_ids.contains(post.task_id()) {
            violations.push(format!(
                "a chat message about no task of ours: {}",
                post.body
            ));
        }
    }
    // Nothing dead-lettered that the sweeper could still have delivered: every result
    // message there is of a task whose result is in the chat.
    let mut dead = HashMap::new();
    for name in ["LONGRUN_WORK_DLQ_URL", "LONGRUN_DELIVERY_DLQ_URL"] {
        let bodies = dead_letters(&stack, name).await;
        for body in &bodies {
            let Some(id) = body["task_id"].as_str() else {
                violations.push(format!("{name} holds an unreadable message {body}"));
                continue;
            };
            let is_result = body["kind"] == "result" || name == "LONGRUN_WORK_DLQ_URL";
            if is_result && stack.task(id).await.delivered_at.is_none() {
                violations.push(format!("{name} holds undelivered task {id}: {body}"));
            }
        }
        dead.insert(name, bodies.len());
    }

    // The figures
    let work = stack.esm.stats("worker").expect("worker mapping");
    let delivery = stack.esm.stats("delivery").expect("delivery mapping");
    let faults = stack.chat.faults();
    let results = started.len();
    let result_attempts: usize = started
        .iter()
        .map(|s| stack.chat.attempts_for(&format!("{}:result", s.task_id)))
        .sum();
    let accepted = stack.chat.messages().len();
    eprintln!(
        "chaos soak, seed {seed}:\n\
         \x20 tasks: {} ({patterns:?}) + {} inline calls, {} users; ended {states:?}\n\
         \x20 kills: {} worker, {} delivery instances (SIGKILL); {} intake retries\n\
         \x20 duplicates: {} work and {} delivery records delivered as extra copies \
         ({} fault switches); chat answered 409 to {} repeated posts\n\
         \x20 chat faults: {} × 500 ({} outage of {} s among them), {} × 429, {} hung, \
         {} accepted but answered late\n\
         \x20 retries: {} result posts for {results} results ({} retries); \
         {} chat requests for {accepted} messages ({} retries)\n\
         \x20 reclaimed: {reclaimed} leases swept back; {undeliverable} results dead-lettered, \
         then re-sent by the sweeper; left in dead-letter queues: {dead:?}\n\
         \x20 progress: {} posted after the result {:?}, {} going backwards {:?}\n\
         \x20 slowest delivery (ack → result in the chat): {} ms ({})\n\
         \x20 instances: {} running at the end\n\
         \x20 time: {} ms to start, {} ms of chaos, {} ms in all",
        started.len(),
        inline.len(),
        users.len(),
        chaos.worker_kills.load(Ordering::SeqCst),
        chaos.delivery_kills.load(Ordering::SeqCst),
        intake_retries.load(Ordering::SeqCst),
        work.duplicated,
        delivery.duplicated,
        chaos.fault_switches.load(Ordering::SeqCst),
        stack.chat.duplicates(),
        faults.errors,
        chaos.outages.load(Ordering::SeqCst),
        OUTAGE.as_secs(),
        faults.throttled,
        faults.hung,
        faults.late,
        result_attempts,
        result_attempts.saturating_sub(results),
        stack.chat.attempts(),
        stack.chat.attempts().saturating_sub(accepted),
        late_progress.len(),
        late_progress,
        backwards_progress.len(),
        backwards_progress,
        slowest.0.as_millis(),
        slowest.1,
        stack.watch.instances(&stack.options.binary),
        ready.as_millis(),
        storm.as_millis(),
        began.elapsed().as_millis(),
    );
    assert!(
        violations.is_empty(),
        "chaos soak failed with seed {seed} ({replay}); {} violations:\n{}",
        violations.len(),
        violations
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    stack.assert_no_secret_in_output();
}
