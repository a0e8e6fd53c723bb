//! The DynamoDB adapter against the dynoxide emulator (in-process, always available): every
//! conditional write of `TaskStore` and `KvStore` behaves as the in-memory store does, and the
//! items are laid out as `docs/task-records.md` tells operators.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{DateTime, Utc};
use longrun::ActionResult;
use longrun::ports::{
    Claim, Created, Finish, FinishGuard, KvStore, LeaseHolder, Peek, PortError, RequestKey,
    Requeue, TaskStore, UsageStore,
};
use longrun::task::{AuditItem, AuditKind, Lease, Progress, Task, TaskId, TaskKind, TaskState};
use longrun_aws::dynamodb::{
    DynamoKv, DynamoTaskStore, DynamoUsage, GSI_BY_LEASE, GSI_BY_USER, TTL_ATTRIBUTE, ensure_table,
    lease_shard,
};
use longrun_tests::dynamo::Dynoxide;
use serde_json::json;

const TTL: Duration = Duration::from_secs(30 * 86_400);

struct Fixture {
    _server: Dynoxide,
    client: Client,
    table: String,
    store: DynamoTaskStore,
}

async fn fixture() -> Fixture {
    let server = Dynoxide::start().await.expect("dynoxide starts");
    let client = server.client().await;
    let table = format!("longrun-{}", TaskId::generate(Utc::now()));
    assert!(
        ensure_table(&client, &table).await.expect("table created"),
        "a fresh table is created"
    );
    let store = DynamoTaskStore::new(client.clone(), &table, TTL);
    Fixture {
        _server: server,
        client,
        table,
        store,
    }
}

impl Fixture {
    /// The raw item, as an operator's `get-item` shows it.
    async fn raw(&self, pk: &str, sk: &str) -> Option<HashMap<String, AttributeValue>> {
        self.client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(pk.to_owned()))
            .key("sk", AttributeValue::S(sk.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .expect("get-item")
            .item
    }

    /// Every item under one partition key, as an operator's `query` shows it.
    async fn partition(&self, pk: &str) -> Vec<HashMap<String, AttributeValue>> {
        self.client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(pk.to_owned()))
            .send()
            .await
            .expect("query")
            .items
            .unwrap_or_default()
    }

    async fn queued(&self, ext: &str, user: &str, at: DateTime<Utc>) -> Task {
        let task = queued_task(ext, user, at);
        assert_eq!(
            self.store.create(&task, None, None).await.unwrap(),
            Created::New
        );
        task
    }

    /// A task claimed by `owner` at `at` with a lease until `at + 60 s`.
    async fn running(&self, owner: &str, at: DateTime<Utc>) -> (Task, Lease) {
        let task = self.queued("text-tools", "u1", at).await;
        let lease = lease(owner, at + secs(60));
        match self.store.claim(&task.task_id, &lease, at).await.unwrap() {
            Claim::Claimed(task) => (task, lease),
            other => panic!("expected Claimed, got {other:?}"),
        }
    }

    /// A task that ran and ended in `state` at t0, its result not delivered.
    async fn finished(&self, state: TaskState) -> TaskId {
        let (task, held) = self.running("w1", t0()).await;
        self.store
            .finish(
                &task.task_id,
                &finish(state, t0(), FinishGuard::Owner(held.owner)),
            )
            .await
            .unwrap();
        task.task_id
    }
}

fn t0() -> DateTime<Utc> {
    "2030-05-01T12:00:00.123Z".parse().unwrap()
}

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

fn lease(owner: &str, until: DateTime<Utc>) -> Lease {
    Lease {
        owner: owner.to_owned(),
        until,
    }
}

fn queued_task(ext: &str, user: &str, at: DateTime<Utc>) -> Task {
    Task {
        task_id: TaskId::generate(at),
        ext: ext.to_owned(),
        user: user.to_owned(),
        chat: "c1".to_owned(),
        function: "refine_output".to_owned(),
        kind: TaskKind::Function,
        event: None,
        name: None,
        state: TaskState::Queued,
        progress: Progress::default(),
        progress_seq: 0,
        attempt: 0,
        cap_s: 180,
        cancel_requested: false,
        created_at: at,
        wake_at: None,
        started_at: None,
        heartbeat_at: None,
        finished_at: None,
        delivered_at: None,
        redeliver_at: None,
        result: None,
        params: json!({"input": "hello"}),
        lease: Some(lease("queue", at + secs(30))),
        request_id: None,
        isolated: false,
        partial: None,
    }
}

fn request(id: &str) -> RequestKey {
    RequestKey {
        ext: "text-tools".to_owned(),
        user: "u1".to_owned(),
        request_id: id.to_owned(),
    }
}

fn finish(state: TaskState, at: DateTime<Utc>, guard: FinishGuard) -> Finish {
    Finish {
        state,
        result: ActionResult::success("Refined output ready! 🎉", json!({"text": "done"})),
        at,
        guard,
        redeliver_at: at + secs(120),
        audit: Vec::new(),
        progress: None,
        partial: None,
    }
}

fn is_conflict<T: std::fmt::Debug>(result: Result<T, PortError>) -> bool {
    matches!(result, Err(PortError::Conflict(_)))
}

fn is_not_found<T: std::fmt::Debug>(result: Result<T, PortError>) -> bool {
    matches!(result, Err(PortError::NotFound(_)))
}

#[tokio::test]
async fn every_task_field_round_trips() {
    // GIVEN a task with every optional field set, nested params and unicode
    let f = fixture().await;
    let at = t0();
    let task = Task {
        event: Some("refined".to_owned()),
        name: Some("Résumé 📄".to_owned()),
        state: TaskState::Running,
        progress: Progress {
            pct: 42,
            message: "halfway — almost 🚀".to_owned(),
        },
        progress_seq: 7,
        attempt: 2,
        cap_s: 1800,
        kind: TaskKind::Job,
        cancel_requested: true,
        started_at: Some(at + secs(1)),
        heartbeat_at: Some(at + secs(2)),
        finished_at: Some(at + secs(3)),
        delivered_at: Some(at + secs(4)),
        result: Some(ActionResult::success(
            "Fertig ✅",
            json!({"text": "日本語", "scores": [1, 2.5, -3], "nested": {"ok": true, "none": null}}),
        )),
        params: json!({"input": "ünïcödé", "n": 12, "list": ["a", {"b": []}], "empty": {}}),
        lease: Some(lease("worker-1", at + secs(60))),
        request_id: Some("req#1".to_owned()),
        isolated: true,
        partial: Some(json!({"text": "so far", "n": [1, 2]})),
        ..queued_task("text#tools", "user%1", at)
    };
    // WHEN it is created and read back
    assert_eq!(
        f.store.create(&task, None, None).await.unwrap(),
        Created::New
    );
    let read = f.store.get(&task.task_id).await.unwrap();
    // THEN every field is as written
    assert_eq!(read.as_ref(), Some(&task));

    // AND the record is laid out for operators: native maps, snake_case state, ISO times
    let pk = format!("TASK#{}", task.task_id);
    let raw = f.raw(&pk, "TASK").await.expect("task item");
    assert_eq!(raw["state"], AttributeValue::S("running".to_owned()));
    assert_eq!(
        raw["created_at"],
        AttributeValue::S("2030-05-01T12:00:00.123Z".to_owned())
    );
    assert!(matches!(&raw["params"], AttributeValue::M(m) if m.contains_key("input")));
    assert!(matches!(&raw["result"], AttributeValue::M(m) if m.contains_key("summary")));
    assert_eq!(raw["progress_pct"], AttributeValue::N("42".to_owned()));
    assert_eq!(
        raw["gsi1pk"],
        AttributeValue::S("USER#text%23tools#user%251".to_owned())
    );
    assert_eq!(
        raw["gsi2pk"],
        AttributeValue::S(format!("LEASE#{:02}", lease_shard(&task.task_id)))
    );
    assert_eq!(
        raw["gsi2sk"],
        AttributeValue::S(format!("2030-05-01T12:01:00.123Z#{}", task.task_id))
    );

    // AND a task with no optional fields leaves them absent and reads back equal
    let bare = Task {
        lease: None,
        params: serde_json::Value::Null,
        ..queued_task("text-tools", "u1", at)
    };
    f.store.create(&bare, None, None).await.unwrap();
    assert_eq!(
        f.store.get(&bare.task_id).await.unwrap(),
        Some(bare.clone())
    );
    let raw = f
        .raw(&format!("TASK#{}", bare.task_id), "TASK")
        .await
        .unwrap();
    for absent in [
        "event",
        "name",
        "started_at",
        "result",
        "lease_owner",
        "gsi2pk",
    ] {
        assert!(!raw.contains_key(absent), "{absent} must be absent");
    }

    // AND an unknown task is None
    let unknown = TaskId::generate(at);
    assert_eq!(f.store.get(&unknown).await.unwrap(), None);
}

#[tokio::test]
async fn a_repeated_request_key_names_the_first_task() {
    // GIVEN a task created under request key r1
    let f = fixture().await;
    let first = queued_task("text-tools", "u1", t0());
    let key = request("r1");
    assert_eq!(
        f.store.create(&first, Some(&key), None).await.unwrap(),
        Created::New
    );
    // WHEN a second task is created under the same key
    let second = queued_task("text-tools", "u1", t0() + secs(1));
    let created = f.store.create(&second, Some(&key), None).await.unwrap();
    // THEN it is a duplicate of the first, and nothing was written for the second
    assert_eq!(created, Created::Duplicate(first.task_id.clone()));
    assert_eq!(f.store.get(&second.task_id).await.unwrap(), None);
    assert_eq!(
        f.store.find_request(&key).await.unwrap(),
        Some(first.task_id.clone())
    );
    // AND the same task under the same key again is simply New
    assert_eq!(
        f.store.create(&first, Some(&key), None).await.unwrap(),
        Created::New
    );
    // AND the key is scoped to its user: another user's r1 is free
    let other_user = RequestKey {
        user: "u2".to_owned(),
        ..key.clone()
    };
    assert_eq!(f.store.find_request(&other_user).await.unwrap(), None);
    let third = queued_task("text-tools", "u2", t0() + secs(2));
    assert_eq!(
        f.store
            .create(&third, Some(&other_user), None)
            .await
            .unwrap(),
        Created::New
    );
    // AND the request item expires a day after the task was created
    let raw = f
        .raw("REQ#text-tools#u1#r1", "REQ")
        .await
        .expect("request item");
    let expected = (t0() + secs(86_400)).timestamp().to_string();
    assert_eq!(raw[TTL_ATTRIBUTE], AttributeValue::N(expected));
}

#[tokio::test]
async fn creating_an_existing_task_is_new_and_keeps_the_record() {
    // GIVEN a task a worker already recovered from its work message and then claimed
    let f = fixture().await;
    let (task, _) = f.running("w1", t0()).await;
    // WHEN intake's (late) create of the same id arrives, with and without a request key
    let late = queued_task("text-tools", "u1", t0());
    let late = Task {
        task_id: task.task_id.clone(),
        ..late
    };
    let key = request("r-late");
    // THEN both answer New and the stored record is untouched
    assert_eq!(
        f.store.create(&late, None, None).await.unwrap(),
        Created::New
    );
    assert_eq!(
        f.store.create(&late, Some(&key), None).await.unwrap(),
        Created::New
    );
    assert_eq!(
        f.store.get(&task.task_id).await.unwrap(),
        Some(task.clone())
    );
    // AND the request key now names the task
    assert_eq!(
        f.store.find_request(&key).await.unwrap(),
        Some(task.task_id.clone())
    );
}

#[tokio::test]
async fn two_concurrent_claims_yield_one_claimed_and_one_busy() {
    // GIVEN a queued task
    let f = fixture().await;
    let task = f.queued("text-tools", "u1", t0()).await;
    let (a, b) = (lease("w-a", t0() + secs(60)), lease("w-b", t0() + secs(60)));
    // WHEN two workers claim it at the same moment
    let (ra, rb) = tokio::join!(
        f.store.claim(&task.task_id, &a, t0()),
        f.store.claim(&task.task_id, &b, t0())
    );
    let outcomes = [ra.unwrap(), rb.unwrap()];
    // THEN exactly one holds it and the other is told it is busy
    let claimed: Vec<&Task> = outcomes
        .iter()
        .filter_map(|c| match c {
            Claim::Claimed(t) => Some(t),
            _ => None,
        })
        .collect();
    let busy = outcomes
        .iter()
        .filter(|c| matches!(c, Claim::Busy(_)))
        .count();
    assert_eq!((claimed.len(), busy), (1, 1), "{outcomes:?}");
    let winner = claimed[0];
    assert_eq!(winner.state, TaskState::Running);
    assert_eq!(winner.attempt, 1);
    assert_eq!(winner.started_at, Some(t0()));
    assert_eq!(winner.heartbeat_at, Some(t0()));
    assert_eq!(
        f.store.get(&task.task_id).await.unwrap().as_ref(),
        Some(winner)
    );
}

#[tokio::test]
async fn a_lapsed_lease_is_reclaimed_with_the_next_attempt() {
    // GIVEN a task claimed at t0 with a lease until t0+60s
    let f = fixture().await;
    let (task, _) = f.running("w1", t0()).await;
    let next = lease("w2", t0() + secs(200));
    // WHEN another worker claims it before the lease lapses
    let early = f.store.claim(&task.task_id, &next, t0() + secs(59)).await;
    // THEN it is busy
    assert!(matches!(early.unwrap(), Claim::Busy(t) if t.lease.as_ref().unwrap().owner == "w1"));
    // WHEN it claims after the lapse
    let late = f.store.claim(&task.task_id, &next, t0() + secs(61)).await;
    // THEN it holds the task, attempt 2, and the first start is kept
    let Claim::Claimed(reclaimed) = late.unwrap() else {
        panic!("expected Claimed")
    };
    assert_eq!(reclaimed.attempt, 2);
    assert_eq!(reclaimed.lease, Some(next));
    assert_eq!(reclaimed.started_at, Some(t0()));
    assert_eq!(reclaimed.heartbeat_at, Some(t0() + secs(61)));
}

#[tokio::test]
async fn claims_of_finished_and_missing_tasks_say_so() {
    // GIVEN a task that ended
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    let at = t0() + secs(5);
    f.store
        .finish(
            &task.task_id,
            &finish(TaskState::Succeeded, at, FinishGuard::Owner(held.owner)),
        )
        .await
        .unwrap();
    // WHEN a duplicate work message claims it
    let claim = f
        .store
        .claim(&task.task_id, &lease("w2", at + secs(60)), at)
        .await;
    // THEN it is told the task finished, with the stored result
    let Claim::Finished(done) = claim.unwrap() else {
        panic!("expected Finished")
    };
    assert_eq!(done.state, TaskState::Succeeded);
    assert!(done.result.is_some());
    // AND a claim of a task that does not exist is Missing, and writes nothing
    let ghost = TaskId::generate(t0());
    let claim = f.store.claim(&ghost, &lease("w2", at), at).await.unwrap();
    assert_eq!(claim, Claim::Missing);
    assert_eq!(f.raw(&format!("TASK#{ghost}"), "TASK").await, None);
}

#[tokio::test]
async fn the_lease_holder_beats_and_a_stranger_conflicts() {
    // GIVEN a running task held by w1
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    // WHEN w1 beats with progress twice
    let renewed = lease("w1", t0() + secs(120));
    let progress = Progress {
        pct: 30,
        message: "reading 📖".to_owned(),
    };
    let beat = f
        .store
        .beat(
            &task.task_id,
            &renewed,
            Some(&progress),
            None,
            t0() + secs(10),
        )
        .await
        .unwrap();
    assert_eq!(beat.progress_seq, 1);
    assert!(!beat.cancel_requested);
    let beat = f
        .store
        .beat(
            &task.task_id,
            &renewed,
            Some(&progress),
            None,
            t0() + secs(11),
        )
        .await
        .unwrap();
    // THEN the sequence is bumped and the lease, heartbeat and checkpoint recorded
    assert_eq!(beat.progress_seq, 2);
    let stored = f.store.get(&task.task_id).await.unwrap().unwrap();
    assert_eq!(stored.lease, Some(renewed.clone()));
    assert_eq!(stored.heartbeat_at, Some(t0() + secs(11)));
    assert_eq!(stored.progress, progress);
    // AND the sweeper's index follows the renewed lease
    let raw = f
        .raw(&format!("TASK#{}", task.task_id), "TASK")
        .await
        .unwrap();
    assert_eq!(
        raw["gsi2sk"],
        AttributeValue::S(format!("2030-05-01T12:02:00.123Z#{}", task.task_id))
    );
    // AND a heartbeat without progress leaves the sequence alone
    let beat = f
        .store
        .beat(&task.task_id, &renewed, None, None, t0() + secs(12))
        .await
        .unwrap();
    assert_eq!(beat.progress_seq, 2);
    // AND a beat carrying a partial result stores it as a native map, leaving progress be
    let partial = json!({"text": "two chunks ✅", "chunks_done": 2, "scores": [1, 2.5]});
    f.store
        .beat(
            &task.task_id,
            &renewed,
            None,
            Some(&partial),
            t0() + secs(12),
        )
        .await
        .unwrap();
    let stored = f.store.get(&task.task_id).await.unwrap().unwrap();
    assert_eq!(stored.partial, Some(partial));
    assert_eq!(stored.progress_seq, 2);
    let raw = f
        .raw(&format!("TASK#{}", task.task_id), "TASK")
        .await
        .unwrap();
    assert!(matches!(raw["partial"], AttributeValue::M(_)));

    // WHEN a stranger beats
    let stranger = f
        .store
        .beat(
            &task.task_id,
            &lease("w2", t0() + secs(500)),
            None,
            None,
            t0() + secs(13),
        )
        .await;
    // THEN it conflicts and changes nothing
    assert!(is_conflict(stranger));
    assert_eq!(
        f.store.get(&task.task_id).await.unwrap().unwrap().lease,
        Some(renewed)
    );
    // AND a beat on a task that does not exist is NotFound
    let ghost = TaskId::generate(t0());
    assert!(is_not_found(
        f.store.beat(&ghost, &held, None, None, t0()).await
    ));
}

#[tokio::test]
async fn a_cancel_request_reaches_the_next_beat() {
    // GIVEN a running task
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    // WHEN the user asks to cancel
    let cancelled = f
        .store
        .request_cancel(&task.task_id, t0() + secs(1))
        .await
        .unwrap();
    assert!(cancelled.cancel_requested);
    // THEN the worker's next beat says so
    let beat = f
        .store
        .beat(&task.task_id, &held, None, None, t0() + secs(2))
        .await
        .unwrap();
    assert!(beat.cancel_requested);
    // AND a cancel request on a queued task conflicts, on a missing one is NotFound
    let queued = f.queued("text-tools", "u1", t0()).await;
    assert!(is_conflict(
        f.store.request_cancel(&queued.task_id, t0()).await
    ));
    let ghost = TaskId::generate(t0());
    assert!(is_not_found(f.store.request_cancel(&ghost, t0()).await));
}

#[tokio::test]
async fn only_the_guard_holder_finishes_a_task() {
    // GIVEN a task held by w1 until t0+60s
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    let id = &task.task_id;
    // WHEN a stranger finishes it
    let stranger = finish(
        TaskState::Succeeded,
        t0() + secs(5),
        FinishGuard::Owner("w2".into()),
    );
    // THEN it conflicts
    assert!(is_conflict(f.store.finish(id, &stranger).await));
    // AND the sweeper cannot end it while the lease is live
    let early = finish(
        TaskState::Failed,
        t0() + secs(59),
        FinishGuard::ExpiredLease,
    );
    assert!(is_conflict(f.store.finish(id, &early).await));
    // AND the Queued guard does not apply to a running task
    let queued_only = finish(TaskState::Cancelled, t0() + secs(5), FinishGuard::Queued);
    assert!(is_conflict(f.store.finish(id, &queued_only).await));
    // WHEN the owner finishes it
    let done = f
        .store
        .finish(
            id,
            &finish(
                TaskState::Succeeded,
                t0() + secs(6),
                FinishGuard::Owner(held.owner.clone()),
            ),
        )
        .await
        .unwrap();
    // THEN it succeeded, with its result, and the lease is gone
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.finished_at, Some(t0() + secs(6)));
    assert_eq!(done.lease, None);
    assert_eq!(
        done.result.as_ref().unwrap().summary,
        "Refined output ready! 🎉"
    );
    // AND nobody can finish it again
    let again = finish(TaskState::Failed, t0() + secs(7), FinishGuard::Abandoned);
    assert!(is_conflict(f.store.finish(id, &again).await));
    // AND finishing a task that does not exist is NotFound
    let ghost = TaskId::generate(t0());
    assert!(is_not_found(f.store.finish(&ghost, &again).await));
}

#[tokio::test]
async fn the_sweeper_finishes_only_after_the_lease_lapsed() {
    // GIVEN a running task whose lease ends at t0+60s
    let f = fixture().await;
    let (task, _) = f.running("w1", t0()).await;
    // WHEN the sweeper ends it at t0+60s exactly
    let at_edge = finish(
        TaskState::Failed,
        t0() + secs(60),
        FinishGuard::ExpiredLease,
    );
    // THEN the lease has not lapsed yet
    assert!(is_conflict(f.store.finish(&task.task_id, &at_edge).await));
    // WHEN it ends it after the lapse
    let lapsed = finish(
        TaskState::Failed,
        t0() + secs(61),
        FinishGuard::ExpiredLease,
    );
    let ended = f.store.finish(&task.task_id, &lapsed).await.unwrap();
    // THEN the task failed
    assert_eq!(ended.state, TaskState::Failed);

    // GIVEN a queued task
    let queued = f.queued("text-tools", "u1", t0()).await;
    // WHEN it is "succeeded" under the Queued guard (queued → succeeded is illegal)
    let illegal = finish(TaskState::Succeeded, t0(), FinishGuard::Queued);
    // THEN it conflicts; a cancel under the same guard succeeds
    assert!(is_conflict(f.store.finish(&queued.task_id, &illegal).await));
    let cancel = finish(TaskState::Cancelled, t0(), FinishGuard::Queued);
    let cancelled = f.store.finish(&queued.task_id, &cancel).await.unwrap();
    assert_eq!(cancelled.state, TaskState::Cancelled);
}

#[tokio::test]
async fn the_audit_items_of_an_end_are_written_only_with_it() {
    // GIVEN a task held by w1, and an end that says it failed critically
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    let critical = AuditItem::new(
        &task,
        "critical#attempts_exhausted",
        AuditKind::Critical,
        t0() + secs(5),
        "the worker stopped on each of 3 attempts",
    );
    let ending = |guard| Finish {
        audit: vec![critical.clone()],
        ..finish(TaskState::Failed, t0() + secs(5), guard)
    };
    // WHEN someone without the lease ends it
    let refused = f
        .store
        .finish(&task.task_id, &ending(FinishGuard::Owner("w2".into())))
        .await;
    // THEN nothing is written: no end, no audit item that claims one
    assert!(is_conflict(refused));
    let trail = f.store.audit_trail(&task.task_id).await.unwrap();
    assert!(
        trail.iter().all(|a| a.kind != AuditKind::Critical),
        "{trail:?}"
    );
    assert_eq!(
        f.store.get(&task.task_id).await.unwrap().unwrap().state,
        TaskState::Running
    );
    // WHEN the owner ends it
    let ended = f
        .store
        .finish(&task.task_id, &ending(FinishGuard::Owner(held.owner)))
        .await
        .unwrap();
    // THEN the end and its audit item are both there
    assert_eq!(ended.state, TaskState::Failed);
    assert_eq!(ended.finished_at, Some(t0() + secs(5)));
    let trail = f.store.audit_trail(&task.task_id).await.unwrap();
    assert!(trail.contains(&critical), "{trail:?}");
    // AND an end of a task that does not exist is NotFound
    let ghost = TaskId::generate(t0());
    assert!(is_not_found(
        f.store
            .finish(&ghost, &ending(FinishGuard::Abandoned))
            .await
    ));
}

#[tokio::test]
async fn a_users_active_tasks_are_counted_within_the_limit() {
    // GIVEN u1 with two tasks under a limit of two
    let f = fixture().await;
    let task = |user: &str| queued_task("text-tools", user, t0());
    let (a, b, c) = (task("u1"), task("u1"), task("u1"));
    for t in [&a, &b] {
        assert_eq!(
            f.store.create(t, None, Some(2)).await.unwrap(),
            Created::New
        );
    }
    // WHEN a third is created
    // THEN it is refused with the two the table counts, and nothing of it is written
    match f.store.create(&c, None, Some(2)).await.unwrap() {
        Created::AtLimit(mut ids) => {
            ids.sort();
            let mut expected = vec![a.task_id.clone(), b.task_id.clone()];
            expected.sort();
            assert_eq!(ids, expected);
        }
        other => panic!("expected AtLimit, got {other:?}"),
    }
    assert!(f.store.get(&c.task_id).await.unwrap().is_none());
    assert!(f.store.audit_trail(&c.task_id).await.unwrap().is_empty());
    // AND another user is not counted with u1, and a task written again is not refused
    assert_eq!(
        f.store.create(&task("u2"), None, Some(2)).await.unwrap(),
        Created::New
    );
    assert_eq!(
        f.store.create(&a, None, Some(2)).await.unwrap(),
        Created::New
    );
    // WHEN one of u1's tasks ends
    let held = lease("w1", t0() + secs(60));
    f.store.claim(&a.task_id, &held, t0()).await.unwrap();
    f.store
        .finish(
            &a.task_id,
            &finish(TaskState::Succeeded, t0(), FinishGuard::Owner("w1".into())),
        )
        .await
        .unwrap();
    // THEN the third fits; a release of a task never counted changes nothing
    f.store
        .release("text-tools", "u1", &TaskId::generate(t0()))
        .await
        .unwrap();
    assert_eq!(
        f.store.create(&c, None, Some(2)).await.unwrap(),
        Created::New
    );
    // AND an explicit release frees a place
    f.store
        .release("text-tools", "u1", &b.task_id)
        .await
        .unwrap();
    assert_eq!(
        f.store.create(&task("u1"), None, Some(2)).await.unwrap(),
        Created::New
    );
}

#[tokio::test]
async fn a_refused_task_is_finished_delivered_and_in_no_index() {
    // GIVEN a task refused at the limit
    let f = fixture().await;
    let task = queued_task("text-tools", "u1", t0());
    let answer = ActionResult::error("You already have 10 tasks queued or running.", true);
    f.store.refuse(&task, &answer, t0()).await.unwrap();
    // THEN its record is failed, with that answer, already delivered
    let stored = f.store.get(&task.task_id).await.unwrap().unwrap();
    assert_eq!(stored.state, TaskState::Failed);
    assert_eq!(stored.result, Some(answer));
    assert_eq!(stored.delivered_at, Some(t0()));
    // AND a worker that gets its work message finds it finished
    let claimed = f
        .store
        .claim(&task.task_id, &lease("w1", t0() + secs(60)), t0())
        .await
        .unwrap();
    assert!(matches!(claimed, Claim::Finished(_)), "{claimed:?}");
    // AND it is in neither index, and expires
    let raw = f
        .raw(&format!("TASK#{}", task.task_id), "TASK")
        .await
        .unwrap();
    for key in ["gsi1pk", "gsi1sk", "gsi2pk", "gsi2sk"] {
        assert!(!raw.contains_key(key), "{key}");
    }
    assert!(raw.contains_key(TTL_ATTRIBUTE));
    assert!(
        f.store
            .list_by_user("text-tools", "u1", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn an_abandoned_task_is_one_nobody_works_on() {
    // GIVEN a running task whose lease ends at t0+60s, and a queued one
    let f = fixture().await;
    let (running, _) = f.running("w1", t0()).await;
    let queued = f.queued("text-tools", "u2", t0()).await;
    // THEN the running one cannot be ended as abandoned while its worker's lease is live
    let live = finish(TaskState::Failed, t0() + secs(30), FinishGuard::Abandoned);
    assert!(is_conflict(f.store.finish(&running.task_id, &live).await));
    // AND can once it lapsed; the queued one can at once
    let lapsed = finish(TaskState::Failed, t0() + secs(61), FinishGuard::Abandoned);
    let ended = f.store.finish(&running.task_id, &lapsed).await.unwrap();
    assert_eq!(ended.state, TaskState::Failed);
    let ended = f.store.finish(&queued.task_id, &live).await.unwrap();
    assert_eq!(ended.state, TaskState::Failed);
}

#[tokio::test]
async fn finish_sets_the_ttl_and_keys_the_sweeper_index_by_redelivery() {
    // GIVEN a running task, in the sweeper's index
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    let pk = format!("TASK#{}", task.task_id);
    let raw = f.raw(&pk, "TASK").await.unwrap();
    assert!(raw.contains_key("gsi2pk") && !raw.contains_key(TTL_ATTRIBUTE));
    // WHEN it finishes
    let at = t0() + secs(9);
    f.store
        .finish(
            &task.task_id,
            &finish(TaskState::Succeeded, at, FinishGuard::Owner(held.owner)),
        )
        .await
        .unwrap();
    // THEN it expires `ttl` after it finished, its lease is gone, and it stays in the
    // sweeper's index by when its (undelivered) result is due again
    let raw = f.raw(&pk, "TASK").await.unwrap();
    let expected = at.timestamp() + TTL.as_secs() as i64;
    assert_eq!(raw[TTL_ATTRIBUTE], AttributeValue::N(expected.to_string()));
    for gone in ["lease_owner", "lease_until"] {
        assert!(!raw.contains_key(gone), "{gone} must be removed");
    }
    assert_eq!(
        raw["gsi2sk"],
        AttributeValue::S(format!("2030-05-01T12:02:09.123Z#{}", task.task_id))
    );
    // AND once delivered it leaves the index
    f.store.mark_delivered(&task.task_id, at).await.unwrap();
    let raw = f.raw(&pk, "TASK").await.unwrap();
    for gone in ["gsi2pk", "gsi2sk", "redeliver_at"] {
        assert!(!raw.contains_key(gone), "{gone} must be removed");
    }
    assert_eq!(
        raw["finished_at"],
        AttributeValue::S("2030-05-01T12:00:09.123Z".into())
    );
}

#[tokio::test]
async fn a_result_is_marked_delivered_once() {
    // GIVEN a finished task
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    f.store
        .finish(
            &task.task_id,
            &finish(TaskState::Succeeded, t0(), FinishGuard::Owner(held.owner)),
        )
        .await
        .unwrap();
    // WHEN delivery marks it twice
    let first = f
        .store
        .mark_delivered(&task.task_id, t0() + secs(1))
        .await
        .unwrap();
    let second = f
        .store
        .mark_delivered(&task.task_id, t0() + secs(2))
        .await
        .unwrap();
    // THEN only the first counts, and its time is kept
    assert!(first);
    assert!(!second);
    let stored = f.store.get(&task.task_id).await.unwrap().unwrap();
    assert_eq!(stored.delivered_at, Some(t0() + secs(1)));
    // AND marking a task that does not exist is NotFound (and creates nothing)
    let ghost = TaskId::generate(t0());
    assert!(is_not_found(f.store.mark_delivered(&ghost, t0()).await));
    assert_eq!(f.raw(&format!("TASK#{ghost}"), "TASK").await, None);
}

#[tokio::test]
async fn audit_items_are_written_once_and_read_oldest_first() {
    // GIVEN a task
    let f = fixture().await;
    let task = f.queued("text-tools", "u1", t0()).await;
    let item = |id: &str, kind, at| AuditItem::new(&task, id, kind, at, format!("{id} ✓"));
    // (create wrote the `created` item already; a second write of it changes nothing)
    let created = AuditItem::new(&task, "created", AuditKind::Created, t0(), "");
    let delivered = item("delivered#result", AuditKind::Delivered, t0() + secs(20));
    let progress = item(
        "delivered#progress#1",
        AuditKind::Delivered,
        t0() + secs(10),
    );
    let critical = item("critical#cap", AuditKind::Critical, t0() + secs(10));
    // WHEN they are appended out of order, one of them twice
    for audit in [&delivered, &created, &progress, &delivered, &critical] {
        f.store.append_audit(audit).await.unwrap();
    }
    // THEN the trail holds each once, oldest first (ties by audit id)
    let trail = f.store.audit_trail(&task.task_id).await.unwrap();
    assert_eq!(trail, vec![created, critical, progress, delivered.clone()]);
    // AND one Query on the task's partition shows the record and its trail
    let partition = f.partition(&format!("TASK#{}", task.task_id)).await;
    assert_eq!(partition.len(), 5);
    // AND audit items expire with the task
    let raw = f
        .raw(&format!("TASK#{}", task.task_id), "AUDIT#delivered#result")
        .await
        .unwrap();
    let expected = delivered.at.timestamp() + TTL.as_secs() as i64;
    assert_eq!(raw[TTL_ATTRIBUTE], AttributeValue::N(expected.to_string()));
    assert_eq!(raw["kind"], AttributeValue::S("delivered".into()));
    // AND a new task's trail starts with the `created` item its creation wrote
    let other = f.queued("text-tools", "u1", t0()).await;
    let trail = f.store.audit_trail(&other.task_id).await.unwrap();
    let ids: Vec<&str> = trail.iter().map(|a| a.audit_id.as_str()).collect();
    assert_eq!(ids, vec!["created"]);
    assert_eq!(trail[0].at, other.created_at);
}

#[tokio::test]
async fn a_users_tasks_are_listed_newest_first() {
    // GIVEN three tasks of u1, one of u2, and one of a look-alike (ext, user) pair
    let f = fixture().await;
    let mut mine = Vec::new();
    for i in 0..3 {
        mine.push(f.queued("text-tools", "u1", t0() + secs(i)).await);
    }
    f.queued("text-tools", "u2", t0() + secs(10)).await;
    f.queued("other-ext", "u1", t0() + secs(11)).await;
    let tricky_a = f.queued("a#b", "c", t0() + secs(12)).await;
    let tricky_b = f.queued("a", "b#c", t0() + secs(13)).await;
    // WHEN u1 lists two
    let listed = f.store.list_by_user("text-tools", "u1", 2).await.unwrap();
    // THEN the two newest of theirs come back, newest first
    let ids: Vec<&TaskId> = listed.iter().map(|t| &t.task_id).collect();
    assert_eq!(ids, vec![&mine[2].task_id, &mine[1].task_id]);
    // AND a larger limit returns all three and nothing else
    let all = f.store.list_by_user("text-tools", "u1", 50).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|t| t.is_owned_by("text-tools", "u1")));
    // AND `#` in ext or user cannot mix two users' lists; an entry is the task as a list
    // shows it (the index holds neither its params nor its lease)
    let listed = |task: Task| Task {
        params: serde_json::Value::Null,
        lease: None,
        heartbeat_at: None,
        ..task
    };
    let a = f.store.list_by_user("a#b", "c", 10).await.unwrap();
    let b = f.store.list_by_user("a", "b#c", 10).await.unwrap();
    assert_eq!(a, vec![listed(tricky_a)]);
    assert_eq!(b, vec![listed(tricky_b)]);
    // AND a limit of zero lists nothing
    assert!(
        f.store
            .list_by_user("text-tools", "u1", 0)
            .await
            .unwrap()
            .is_empty()
    );
    // AND the index is the one the design names
    let described = f
        .client
        .describe_table()
        .table_name(&f.table)
        .send()
        .await
        .unwrap();
    let mut names: Vec<&str> = described
        .table()
        .unwrap()
        .global_secondary_indexes()
        .iter()
        .filter_map(|i| i.index_name())
        .collect();
    names.sort_unstable();
    assert_eq!(names, vec![GSI_BY_LEASE, GSI_BY_USER]);
}

#[tokio::test]
async fn expired_leases_are_only_lapsed_live_tasks() {
    // GIVEN a queued task whose queue lease lapses at t0+30s, a running one lapsing at
    // t0+60s, a running one with a live lease, and a finished one
    let f = fixture().await;
    let queued = f.queued("text-tools", "u1", t0()).await;
    let (stale, _) = f.running("w1", t0()).await;
    let (live, _) = f.running("w2", t0() + secs(100)).await;
    let (done, held) = f.running("w3", t0()).await;
    f.store
        .finish(
            &done.task_id,
            &finish(TaskState::Succeeded, t0(), FinishGuard::Owner(held.owner)),
        )
        .await
        .unwrap();
    // WHEN the sweeper looks at t0+90s
    let now = t0() + secs(90);
    let expired = f.store.expired_leases(now, 10).await.unwrap();
    // THEN it sees the lapsed queued and running tasks, oldest lease first
    let ids: Vec<&TaskId> = expired.iter().map(|t| &t.task_id).collect();
    assert_eq!(ids, vec![&queued.task_id, &stale.task_id]);
    assert!(!ids.contains(&&live.task_id));
    // AND the limit holds
    let one = f.store.expired_leases(now, 1).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].task_id, queued.task_id);
    // AND before anything lapsed there is nothing to do
    assert!(
        f.store
            .expired_leases(t0() + secs(1), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn the_sweeper_reads_every_lease_shard_oldest_first() {
    // GIVEN 48 running tasks, their leases lapsing a second apart, spread over the shards
    let f = fixture().await;
    let mut tasks = Vec::new();
    for i in 0..48 {
        let (task, _) = f.running("w", t0() + secs(i)).await;
        tasks.push(task);
    }
    let shards: std::collections::BTreeSet<u32> =
        tasks.iter().map(|t| lease_shard(&t.task_id)).collect();
    assert!(shards.len() > 8, "{shards:?}");
    // WHEN the sweeper asks for the 20 oldest after all lapsed
    let expired = f.store.expired_leases(t0() + secs(200), 20).await.unwrap();
    // THEN it gets exactly those, across shards, oldest lease first
    let ids: Vec<&TaskId> = expired.iter().map(|t| &t.task_id).collect();
    let oldest: Vec<&TaskId> = tasks[..20].iter().map(|t| &t.task_id).collect();
    assert_eq!(ids, oldest);
    // AND an entry holds the keys only: the sweeper reads the record itself
    let pk = format!("TASK#{}", tasks[0].task_id);
    let entry = f
        .client
        .query()
        .table_name(&f.table)
        .index_name(GSI_BY_LEASE)
        .key_condition_expression("gsi2pk = :pk")
        .expression_attribute_values(
            ":pk",
            AttributeValue::S(format!("LEASE#{:02}", lease_shard(&tasks[0].task_id))),
        )
        .send()
        .await
        .unwrap()
        .items
        .unwrap_or_default()
        .into_iter()
        .find(|item| item.get("pk") == Some(&AttributeValue::S(pk.clone())))
        .expect("index entry");
    let mut names: Vec<&str> = entry.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, vec!["gsi2pk", "gsi2sk", "pk", "sk"]);
}

#[tokio::test]
async fn an_undelivered_result_is_swept_at_its_redeliver_time_until_delivered() {
    // GIVEN a task that finished at t0, its result due again at t0+120s
    let f = fixture().await;
    let id = &f.finished(TaskState::Succeeded).await;
    let due = |at| {
        let store = &f.store;
        async move {
            let tasks = store.expired_leases(at, 10).await.unwrap();
            tasks.iter().any(|t| &t.task_id == id)
        }
    };
    // THEN the sweeper does not see it before then, and does after
    assert!(!due(t0() + secs(119)).await);
    assert!(due(t0() + secs(121)).await);
    let stored = f.store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.redeliver_at, Some(t0() + secs(120)));
    // WHEN the sweeper moves it on, it is due at the new time only
    assert!(
        f.store
            .reschedule_delivery(id, Some(t0() + secs(1000)))
            .await
            .unwrap()
    );
    assert!(!due(t0() + secs(999)).await);
    assert!(due(t0() + secs(1001)).await);
    // WHEN delivery marks it delivered, it leaves the sweeper's index for good
    assert!(f.store.mark_delivered(id, t0() + secs(1002)).await.unwrap());
    assert!(!due(t0() + secs(5000)).await);
    let stored = f.store.get(id).await.unwrap().unwrap();
    assert_eq!(stored.redeliver_at, None);
    // AND a delivered task is not rescheduled, nor is a live one
    assert!(!f.store.reschedule_delivery(id, Some(t0())).await.unwrap());
    let (live, _) = f.running("w2", t0()).await;
    assert!(is_conflict(
        f.store.reschedule_delivery(&live.task_id, Some(t0())).await
    ));
}

#[tokio::test]
async fn a_result_the_chat_refused_leaves_the_sweepers_index() {
    // GIVEN a finished, undelivered task
    let f = fixture().await;
    let id = &f.finished(TaskState::Failed).await;
    // WHEN its re-sends are stopped
    assert!(f.store.reschedule_delivery(id, None).await.unwrap());
    // THEN no sweep sees it again
    assert!(
        f.store
            .expired_leases(t0() + secs(100_000), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn requeue_is_guarded_by_owner_or_lapse() {
    // GIVEN a running task held by w1 until t0+60s
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    let id = &task.task_id;
    let held_attempt = f.store.get(id).await.unwrap().unwrap().attempt;
    let queue_lease = lease("queue", t0() + secs(300));
    // WHEN a stranger hands it back to the queue
    let stranger = f
        .store
        .requeue(id, &Requeue::Owner("w2".into()), &queue_lease)
        .await;
    // THEN it conflicts; so does the sweeper before the lease lapsed
    assert!(is_conflict(stranger));
    let early = f
        .store
        .requeue(id, &Requeue::Expired(t0() + secs(30)), &queue_lease)
        .await;
    assert!(is_conflict(early));
    // WHEN the owner hands it back
    let requeued = f
        .store
        .requeue(id, &Requeue::Owner(held.owner.clone()), &queue_lease)
        .await
        .unwrap();
    // THEN it is queued under the queue lease, in the sweeper's index at that lease, and the
    // hand-off gave its attempt back
    assert_eq!(requeued.state, TaskState::Queued);
    assert_eq!(requeued.lease, Some(queue_lease.clone()));
    assert_eq!(requeued.attempt, held_attempt - 1);
    let raw = f.raw(&format!("TASK#{id}"), "TASK").await.unwrap();
    assert_eq!(
        raw["gsi2sk"],
        AttributeValue::S(format!("2030-05-01T12:05:00.123Z#{id}"))
    );
    // AND the former owner can no longer requeue it
    let again = f
        .store
        .requeue(id, &Requeue::Owner(held.owner), &queue_lease)
        .await;
    assert!(is_conflict(again));
    // AND the sweeper can revive it once the queue lease lapsed
    let revived_lease = lease("queue", t0() + secs(900));
    let revived = f
        .store
        .requeue(id, &Requeue::Expired(t0() + secs(301)), &revived_lease)
        .await
        .unwrap();
    assert_eq!(revived.lease, Some(revived_lease.clone()));
    assert_eq!(
        revived.attempt,
        held_attempt - 1,
        "a revival counts no attempt by itself"
    );
    // AND requeueing a task that does not exist is NotFound
    let ghost = TaskId::generate(t0());
    assert!(is_not_found(
        f.store
            .requeue(&ghost, &Requeue::Isolate(t0()), &revived_lease)
            .await
    ));
    let ghost = TaskId::generate(t0());
    assert!(is_not_found(
        f.store
            .requeue(&ghost, &Requeue::Expired(t0()), &revived_lease)
            .await
    ));
}

#[tokio::test]
async fn a_task_whose_process_died_with_others_is_requeued_isolated() {
    // GIVEN a running task held by a worker process until t0+60s
    let f = fixture().await;
    let (task, _) = f.running("p1/w1", t0()).await;
    let id = &task.task_id;
    let queue_lease = lease("queue", t0() + secs(300));
    // WHEN the sweeper isolates it before and after the lease lapsed
    let early = f
        .store
        .requeue(id, &Requeue::Isolate(t0() + secs(30)), &queue_lease)
        .await;
    let requeued = f
        .store
        .requeue(id, &Requeue::Isolate(t0() + secs(61)), &queue_lease)
        .await
        .unwrap();
    // THEN only the lapsed lease is requeued, marked isolated, its attempt kept and uncounted
    assert!(is_conflict(early));
    assert_eq!(requeued.state, TaskState::Queued);
    assert!(requeued.isolated);
    assert_eq!(requeued.attempt, task.attempt);
    assert_eq!(requeued.counted_attempts(), task.attempt - 1);
    assert_eq!(f.store.get(id).await.unwrap().unwrap(), requeued);
    // AND a queued task is not isolated: only a running one died in a process
    let queued = f
        .store
        .requeue(id, &Requeue::Isolate(t0() + secs(301)), &queue_lease)
        .await;
    assert!(is_conflict(queued));
}

#[tokio::test]
async fn budget_meters_count_each_charge_once_per_user_and_day() {
    let f = fixture().await;
    let usage = DynamoUsage::new(f.client.clone(), &f.table);
    let day = t0().date_naive();
    let next_day = day.succ_opt().unwrap();
    // GIVEN charges of u1's tokens, one of them retried, and of another meter, user and day
    assert_eq!(
        usage
            .charge("ext#1", "u1", "tokens", day, "r1:tokens:1", 40)
            .await
            .unwrap(),
        40
    );
    assert_eq!(
        usage
            .charge("ext#1", "u1", "tokens", day, "r1:tokens:2", 25)
            .await
            .unwrap(),
        65
    );
    // WHEN the first charge comes again (a resumed task charging at the same position)
    let again = usage
        .charge("ext#1", "u1", "tokens", day, "r1:tokens:1", 40)
        .await;
    // THEN it is not counted again, and the total is answered all the same
    assert_eq!(again.unwrap(), 65);
    usage
        .charge("ext#1", "u1", "seconds", day, "r1:seconds:1", 7)
        .await
        .unwrap();
    usage
        .charge("ext#1", "u2", "tokens", day, "r2:tokens:1", 99)
        .await
        .unwrap();
    usage
        .charge("ext#1", "u1", "tokens", next_day, "r3:tokens:1", 5)
        .await
        .unwrap();
    // AND each (user, day) reads its own meters
    let of = |user: &'static str, day| {
        let usage = usage.clone();
        async move { usage.usage("ext#1", user, day).await.unwrap() }
    };
    assert_eq!(
        of("u1", day).await,
        [("seconds".to_owned(), 7), ("tokens".to_owned(), 65)].into()
    );
    assert_eq!(of("u2", day).await, [("tokens".to_owned(), 99)].into());
    assert_eq!(of("u1", next_day).await, [("tokens".to_owned(), 5)].into());
    // AND the item carries its TTL, two days after its day
    let items = f.partition("USAGE#ext%231#u1").await;
    assert_eq!(items.len(), 3);
    assert!(items.iter().all(|i| i.contains_key(TTL_ATTRIBUTE)));
    // WHEN one meter, then every meter of the day is reset
    usage
        .reset("ext#1", "u1", day, Some("seconds"))
        .await
        .unwrap();
    assert_eq!(of("u1", day).await, [("tokens".to_owned(), 65)].into());
    usage.reset("ext#1", "u1", day, None).await.unwrap();
    // THEN that day is empty, and the other day and user keep theirs
    assert!(of("u1", day).await.is_empty());
    assert_eq!(of("u1", next_day).await, [("tokens".to_owned(), 5)].into());
    assert_eq!(of("u2", day).await, [("tokens".to_owned(), 99)].into());
    // AND a charge after a reset counts from zero, even under an id seen before
    assert_eq!(
        usage
            .charge("ext#1", "u1", "tokens", day, "r1:tokens:1", 40)
            .await
            .unwrap(),
        40
    );
}

#[tokio::test]
async fn ensure_table_is_idempotent() {
    // GIVEN a table ensure_table created
    let f = fixture().await;
    // WHEN it runs again
    let created = ensure_table(&f.client, &f.table).await.unwrap();
    // THEN it reports the table already existed, and the table still works
    assert!(!created);
    f.queued("text-tools", "u1", t0()).await;
}

#[tokio::test]
async fn the_store_is_private_to_each_ext_and_user() {
    // GIVEN values set by u1 of two extensions
    let f = fixture().await;
    let kv = DynamoKv::new(f.client.clone(), &f.table);
    let value = json!({"draft": "ünïcödé ✍️", "n": 3, "tags": ["a"], "none": null});
    kv.set("text-tools", "u1", "draft", &value, None)
        .await
        .unwrap();
    kv.set("other", "u1", "draft", &json!("theirs"), None)
        .await
        .unwrap();
    // WHEN u1 of text-tools and u2 read the key
    // THEN each sees only its own value
    assert_eq!(
        kv.get("text-tools", "u1", "draft").await.unwrap(),
        Some(value)
    );
    assert_eq!(kv.get("text-tools", "u2", "draft").await.unwrap(), None);
    assert_eq!(
        kv.get("other", "u1", "draft").await.unwrap(),
        Some(json!("theirs"))
    );
    // WHEN the value is overwritten, then deleted
    kv.set("text-tools", "u1", "draft", &json!(42), None)
        .await
        .unwrap();
    assert_eq!(
        kv.get("text-tools", "u1", "draft").await.unwrap(),
        Some(json!(42))
    );
    kv.delete("text-tools", "u1", "draft", None).await.unwrap();
    // THEN it is gone for u1 of text-tools only, and deleting again is fine
    assert_eq!(kv.get("text-tools", "u1", "draft").await.unwrap(), None);
    assert_eq!(
        kv.get("other", "u1", "draft").await.unwrap(),
        Some(json!("theirs"))
    );
    kv.delete("text-tools", "u1", "draft", None).await.unwrap();
    // AND a stored null reads back as null, not as absent
    kv.set(
        "text-tools",
        "u1",
        "nothing",
        &serde_json::Value::Null,
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        kv.get("text-tools", "u1", "nothing").await.unwrap(),
        Some(serde_json::Value::Null)
    );
}

#[tokio::test]
async fn steps_are_stored_once_in_the_tasks_partition_and_read_in_order() {
    use longrun::StepRecord;
    // GIVEN a task with an audit item
    let f = fixture().await;
    let task = f.queued("text-tools", "u1", t0()).await;
    f.store
        .append_audit(&AuditItem::new(
            &task,
            "created",
            AuditKind::Created,
            t0(),
            "",
        ))
        .await
        .unwrap();
    let step = |seq: u32, name: &str, output: serde_json::Value| StepRecord {
        seq,
        name: name.to_owned(),
        output,
        at: t0() + secs(i64::from(seq)),
    };
    let first = step(
        0,
        "chunk-0",
        serde_json::json!({"text": "ünïcode ✓", "n": [1, 2.5, null]}),
    );
    let eleventh = step(10, "chunk-10", serde_json::json!("done"));
    let now = t0();
    let held = Lease {
        owner: "w1".into(),
        until: now + secs(60),
    };
    f.store.claim(&task.task_id, &held, now).await.unwrap();
    let holder = LeaseHolder {
        task_id: task.task_id.clone(),
        owner: "w1".into(),
    };
    // WHEN steps are recorded out of order, one twice with another output
    assert_eq!(
        f.store.record_step(&holder, &eleventh).await.unwrap(),
        eleventh
    );
    assert_eq!(f.store.record_step(&holder, &first).await.unwrap(), first);
    let rewrite = step(0, "chunk-0", serde_json::json!("a second output"));
    // THEN the second write of a position answers with what the first stored
    assert_eq!(f.store.record_step(&holder, &rewrite).await.unwrap(), first);
    // AND they read back in order, the first write kept
    let steps = f.store.steps(&task.task_id).await.unwrap();
    assert_eq!(steps, vec![first.clone(), eleventh]);
    // AND the audit trail does not see them, while one Query shows the whole story
    assert_eq!(f.store.audit_trail(&task.task_id).await.unwrap().len(), 1);
    let partition = f.partition(&format!("TASK#{}", task.task_id)).await;
    assert_eq!(partition.len(), 4);
    // AND steps expire with the task
    let raw = f
        .raw(&format!("TASK#{}", task.task_id), "STEP#000010")
        .await
        .expect("step item");
    assert!(raw.contains_key(TTL_ATTRIBUTE));
    // AND a task without steps has none
    let other = f.queued("text-tools", "u1", t0()).await;
    assert!(f.store.steps(&other.task_id).await.unwrap().is_empty());
}

#[tokio::test]
async fn step_and_store_writes_need_the_lease() {
    use longrun::StepRecord;
    // GIVEN a task w1 ran until its lease lapsed and w2 took it over
    let f = fixture().await;
    let task = f.queued("text-tools", "u1", t0()).await;
    let lease = |owner: &str, at| Lease {
        owner: owner.into(),
        until: at + secs(60),
    };
    f.store
        .claim(&task.task_id, &lease("w1", t0()), t0())
        .await
        .unwrap();
    f.store
        .claim(
            &task.task_id,
            &lease("w2", t0() + secs(61)),
            t0() + secs(61),
        )
        .await
        .unwrap();
    let holder = |owner: &str| LeaseHolder {
        task_id: task.task_id.clone(),
        owner: owner.into(),
    };
    let step = StepRecord {
        seq: 0,
        name: "chunk-0".into(),
        output: json!("w1's output"),
        at: t0() + secs(62),
    };
    let kv = DynamoKv::new(f.client.clone(), &f.table);
    // WHEN w1 records a step and writes the store
    // THEN both are refused and nothing is written
    assert!(is_conflict(f.store.record_step(&holder("w1"), &step).await));
    assert!(f.store.steps(&task.task_id).await.unwrap().is_empty());
    let w1 = holder("w1");
    assert!(is_conflict(
        kv.set("text-tools", "u1", "draft", &json!("w1"), Some(&w1))
            .await
    ));
    assert!(is_conflict(
        kv.delete("text-tools", "u1", "draft", Some(&w1)).await
    ));
    assert_eq!(kv.get("text-tools", "u1", "draft").await.unwrap(), None);
    // AND w2's writes land
    let w2 = holder("w2");
    let mine = StepRecord {
        output: json!("w2's output"),
        ..step
    };
    assert_eq!(f.store.record_step(&w2, &mine).await.unwrap(), mine);
    kv.set("text-tools", "u1", "draft", &json!("w2"), Some(&w2))
        .await
        .unwrap();
    assert_eq!(
        kv.get("text-tools", "u1", "draft").await.unwrap(),
        Some(json!("w2"))
    );
    kv.delete("text-tools", "u1", "draft", Some(&w2))
        .await
        .unwrap();
    assert_eq!(kv.get("text-tools", "u1", "draft").await.unwrap(), None);
}

#[tokio::test]
async fn the_table_stores_what_check_storable_passes_and_refuses_the_rest() {
    // GIVEN params at the edges of what `check_storable` lets through
    let f = fixture().await;
    let nested = |levels: usize| (0..levels).fold(json!(1), |inner, _| json!({ "a": inner }));
    let edge = json!({"big": 9.9e125, "tiny": 1e-130, "n": u64::MAX, "deep": nested(30)});
    assert_eq!(longrun::wire::check_storable(&edge), Ok(()));
    // WHEN a task holding them is created and read back
    let task = Task {
        params: edge.clone(),
        ..queued_task("text-tools", "u1", t0())
    };
    assert_eq!(
        f.store.create(&task, None, None).await.unwrap(),
        Created::New
    );
    // THEN the record keeps them as given
    let stored = f.store.get(&task.task_id).await.unwrap().unwrap();
    assert_eq!(stored.params, edge);

    // AND what `check_storable` refuses, the table refuses too — permanently, not as a
    // retryable failure: a number beyond DynamoDB's range, and one level more than the 32 it
    // allows (params, 31 objects, and the number they end in: 33)
    for refused in [json!({"x": 1e300}), json!({ "deep": nested(31) })] {
        assert!(
            longrun::wire::check_storable(&refused).is_err(),
            "{refused}"
        );
        let task = Task {
            params: refused,
            ..queued_task("text-tools", "u1", t0())
        };
        let err = f.store.create(&task, None, None).await.unwrap_err();
        assert!(!err.is_transient(), "{err}");
    }
}

#[tokio::test]
async fn an_unreadable_item_does_not_stop_the_sweep() {
    // GIVEN the oldest lapsed item in the sweeper's index no longer reads as a task
    let f = fixture().await;
    let garbled = f.queued("text-tools", "u1", t0()).await;
    f.client
        .update_item()
        .table_name(&f.table)
        .key("pk", AttributeValue::S(format!("TASK#{}", garbled.task_id)))
        .key("sk", AttributeValue::S("TASK".to_owned()))
        .update_expression("SET #state = :bogus")
        .expression_attribute_names("#state", "state")
        .expression_attribute_values(":bogus", AttributeValue::S("exploded".to_owned()))
        .send()
        .await
        .unwrap();
    assert!(f.store.get(&garbled.task_id).await.is_err());
    // AND a readable task lapsed after it
    let readable = f.queued("text-tools", "u1", t0() + secs(1)).await;
    // WHEN the sweeper looks
    let expired = f.store.expired_leases(t0() + secs(600), 10).await.unwrap();
    // THEN it gets the readable task
    let ids: Vec<&TaskId> = expired.iter().map(|t| &t.task_id).collect();
    assert_eq!(ids, vec![&readable.task_id]);
}

#[tokio::test]
async fn a_sleeping_task_is_claimed_only_when_due_or_cancelled() {
    // GIVEN a task running under w1 that goes to sleep until t0+600s
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    let id = &task.task_id;
    let wake = t0() + secs(600);
    let queue_lease = lease("queue", wake + secs(300));
    // WHEN a stranger puts it to sleep, it conflicts
    assert!(is_conflict(
        f.store.suspend(id, "w2", wake, &queue_lease).await
    ));
    // WHEN its holder does
    let sleeping = f
        .store
        .suspend(id, &held.owner, wake, &queue_lease)
        .await
        .unwrap();
    // THEN the record says so, with its wake time, under the queue lease, in the sweeper's
    // index at that lease, and the attempt given back
    assert_eq!(sleeping.state, TaskState::Sleeping);
    assert_eq!(sleeping.wake_at, Some(wake));
    assert_eq!(sleeping.lease, Some(queue_lease.clone()));
    assert_eq!(sleeping.attempt, task.attempt - 1);
    assert_eq!(f.store.get(id).await.unwrap().unwrap(), sleeping);
    let raw = f.raw(&format!("TASK#{id}"), "TASK").await.unwrap();
    assert_eq!(raw["state"], AttributeValue::S("sleeping".into()));
    assert_eq!(
        raw["gsi2sk"],
        AttributeValue::S(format!("2030-05-01T12:15:00.123Z#{id}"))
    );
    // AND the sweeper does not see it before its lease lapses
    let swept: Vec<TaskId> = f
        .store
        .expired_leases(wake + secs(10), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.task_id)
        .collect();
    assert!(!swept.contains(id));
    // AND its lease holder can no longer beat or finish it
    assert!(is_conflict(
        f.store.beat(id, &held, None, None, t0() + secs(5)).await
    ));
    // WHEN a worker claims it before it wakes, it is busy
    let early = lease("w3", t0() + secs(120));
    assert!(matches!(
        f.store.claim(id, &early, t0() + secs(60)).await.unwrap(),
        Claim::Busy(t) if t.state == TaskState::Sleeping
    ));
    // WHEN the user cancels, the flag is set on the sleeping task, and a claim now succeeds
    let flagged = f.store.request_cancel(id, t0() + secs(61)).await.unwrap();
    assert!(flagged.cancel_requested);
    assert_eq!(flagged.state, TaskState::Sleeping);
    let claimed = match f.store.claim(id, &early, t0() + secs(62)).await.unwrap() {
        Claim::Claimed(t) => t,
        other => panic!("expected Claimed, got {other:?}"),
    };
    // THEN it runs again with the attempt it had, no longer sleeping
    assert_eq!(claimed.state, TaskState::Running);
    assert_eq!(claimed.wake_at, None);
    assert_eq!(claimed.attempt, task.attempt);
    assert!(
        !f.raw(&format!("TASK#{id}"), "TASK")
            .await
            .unwrap()
            .contains_key("wake_at")
    );
}

#[tokio::test]
async fn a_sleeping_task_wakes_on_time_and_is_revived_or_abandoned_when_its_message_is_lost() {
    // GIVEN two sleeping tasks, due at t0+600s
    let f = fixture().await;
    let wake = t0() + secs(600);
    let queue_lease = lease("queue", wake + secs(300));
    let mut ids = Vec::new();
    for owner in ["w1", "w2"] {
        let (task, held) = f.running(owner, t0()).await;
        f.store
            .suspend(&task.task_id, &held.owner, wake, &queue_lease)
            .await
            .unwrap();
        ids.push(task.task_id);
    }
    // WHEN its message comes at its wake time, the first is claimed
    let w3 = lease("w3", wake + secs(60));
    assert!(matches!(
        f.store.claim(&ids[0], &w3, wake).await.unwrap(),
        Claim::Claimed(t) if t.state == TaskState::Running
    ));
    // WHEN the second's message was lost: the sweeper revives it once its lease lapsed
    let early = f
        .store
        .requeue(&ids[1], &Requeue::Expired(wake + secs(10)), &queue_lease)
        .await;
    assert!(is_conflict(early));
    let revived = f
        .store
        .requeue(
            &ids[1],
            &Requeue::Expired(wake + secs(301)),
            &lease("queue", wake + secs(900)),
        )
        .await
        .unwrap();
    assert_eq!(revived.state, TaskState::Queued);
    assert_eq!(revived.wake_at, None);
    // AND a dead-lettered message ends a sleeping task that nobody works on
    let (third, held) = f.running("w4", t0()).await;
    f.store
        .suspend(&third.task_id, &held.owner, wake, &queue_lease)
        .await
        .unwrap();
    let ended = f
        .store
        .finish(
            &third.task_id,
            &finish(TaskState::Failed, t0() + secs(5), FinishGuard::Abandoned),
        )
        .await
        .unwrap();
    assert_eq!(ended.state, TaskState::Failed);
    assert_eq!(ended.wake_at, None);
}

#[tokio::test]
async fn a_finish_stores_the_runs_last_checkpoint_with_it() {
    // GIVEN a running task whose run reported progress and a partial result it did not write
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    let progress = Progress {
        pct: 90,
        message: "Saving".to_owned(),
    };
    // WHEN it ends with them
    let ended = f
        .store
        .finish(
            &task.task_id,
            &Finish {
                progress: Some(progress.clone()),
                partial: Some(json!({"text": "so far"})),
                ..finish(
                    TaskState::Succeeded,
                    t0() + secs(5),
                    FinishGuard::Owner(held.owner),
                )
            },
        )
        .await
        .unwrap();
    // THEN the one write stored them, without counting a progress message
    assert_eq!(ended.progress, progress);
    assert_eq!(ended.partial, Some(json!({"text": "so far"})));
    assert_eq!(ended.progress_seq, task.progress_seq);
    assert_eq!(f.store.get(&task.task_id).await.unwrap().unwrap(), ended);
}

#[tokio::test]
async fn a_peek_reads_the_state_the_lease_holder_and_the_cancel_flag() {
    // GIVEN a running task held by w1
    let f = fixture().await;
    let (task, held) = f.running("w1", t0()).await;
    // WHEN a worker peeks at it, THEN it sees itself holding it, no cancel asked
    let peek = f.store.peek(&task.task_id).await.unwrap().unwrap();
    assert_eq!(
        peek,
        Peek {
            state: TaskState::Running,
            lease_owner: Some(held.owner.clone()),
            cancel_requested: false,
        }
    );
    // AND once the user cancels, the flag
    f.store
        .request_cancel(&task.task_id, t0() + secs(1))
        .await
        .unwrap();
    assert!(
        f.store
            .peek(&task.task_id)
            .await
            .unwrap()
            .unwrap()
            .cancel_requested
    );
    // AND a task that does not exist is None
    let ghost = TaskId::generate(t0());
    assert_eq!(f.store.peek(&ghost).await.unwrap(), None);
}
