//! The sample events of `events/`, played in order against one stack by any way of invoking
//! a function — AWS's Runtime Interface Emulator on the host (`tests/rie_events.rs`), or
//! `sam local invoke` in a container (`tests/sam_local.rs`) — with each answer and its effect
//! checked: the task record, the queue message, the chat post.

use std::future::Future;

use longrun::TaskState;
use serde_json::{Value, json};

use crate::e2e::Stack;

/// The task the sample events name (`longrun_dev::events::SAMPLE_TASK_ID`).
pub const SAMPLE_TASK: &str = longrun_dev::events::SAMPLE_TASK_ID;

/// Each event file, with the role of the function it is for, in the order they are played.
pub const EVENTS: [(&str, &str); 9] = [
    ("intake", "intake-call-refine.json"),
    ("intake", "intake-call-refine_output.json"),
    ("intake", "intake-call-start_refinement.json"),
    ("intake", "intake-status.json"),
    ("intake", "intake-list.json"),
    ("worker", "worker-sqs.json"),
    ("delivery", "delivery-sqs.json"),
    ("intake", "intake-cancel.json"),
    ("sweeper", "sweeper-schedule.json"),
];

/// Plays every event of [`EVENTS`] through `invoke(role, file)` (the function's JSON answer)
/// and checks what each did. Expects the user `u1` to have an OpenAI key connected, nothing
/// queued yet for the sample task, and no event source mapping or sweeper running.
pub async fn play<F, Fut>(stack: &Stack, invoke: F)
where
    F: Fn(&'static str, &'static str) -> Fut,
    Fut: Future<Output = Value>,
{
    assert_every_file_is_played();
    let [
        refine,
        refine_output,
        start_refinement,
        status,
        list,
        worker,
        delivery,
        cancel,
        sweeper,
    ] = EVENTS;

    // Pattern A: answered inline, from the (fake) model.
    let answer = invoke(refine.0, refine.1).await;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(
        answer["result"]["summary"], "Refined text ready!",
        "{answer}"
    );

    // Pattern B: the ack, a queued task record and its work message.
    let before = stack.queue_depth("LONGRUN_WORK_QUEUE_URL").await;
    let ack = invoke(refine_output.0, refine_output.1).await;
    assert_eq!(ack["status"], 200, "{ack}");
    let task_b = ack["result"]["data"]["task_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        ack["result"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("Started 'refine_output' in background"),
        "{ack}"
    );
    let record = stack.task(&task_b).await;
    assert_eq!(
        (record.state, record.user.as_str(), record.chat.as_str()),
        (TaskState::Queued, "u1", "c1")
    );
    assert_eq!(
        stack.queue_depth("LONGRUN_WORK_QUEUE_URL").await,
        before + 1
    );

    // Pattern C: the handler's own ack, and the job's task.
    let job = invoke(start_refinement.0, start_refinement.1).await;
    assert_eq!(job["status"], 200, "{job}");
    assert_eq!(
        job["result"]["summary"],
        "Got it — refining (≈90s). I'll send the result here."
    );
    let task_c = job["result"]["data"]["task_id"].as_str().unwrap();
    assert_eq!(stack.task(task_c).await.function, "refine_job");

    // The sample task does not exist yet: status is 404, the list has B and C.
    let answer = invoke(status.0, status.1).await;
    assert_eq!(answer["status"], 404, "{answer}");
    let answer = invoke(list.0, list.1).await;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["tasks"].as_array().unwrap().len(), 2, "{answer}");

    // The worker's batch names the sample task: its record is written from the message, the
    // handler runs, and a result message goes to the delivery queue.
    let batch = invoke(worker.0, worker.1).await;
    assert_eq!(batch["batchItemFailures"], json!([]), "{batch}");
    let ran = stack.task(SAMPLE_TASK).await;
    assert_eq!(ran.state, TaskState::Succeeded, "{ran:?}");
    assert_eq!(
        ran.result.as_ref().unwrap().summary,
        "Refined output ready! 🎉"
    );
    assert!(stack.queue_depth("LONGRUN_DELIVERY_QUEUE_URL").await >= 1);

    // Delivery's batch (a progress and the result of the sample task) posts into c1, once.
    let posted = invoke(delivery.0, delivery.1).await;
    assert_eq!(posted["batchItemFailures"], json!([]), "{posted}");
    let results = stack.chat.results_for(SAMPLE_TASK);
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["summary"], "Refined output ready! 🎉");
    assert!(!stack.chat.in_chat("c1").is_empty());
    assert!(stack.task(SAMPLE_TASK).await.delivered_at.is_some());

    // Now the sample task exists: its status, and a cancel of a finished task is 409.
    let answer = invoke(status.0, status.1).await;
    assert_eq!(answer["status"], 200, "{answer}");
    assert_eq!(answer["task"]["state"], "succeeded");
    let answer = invoke(cancel.0, cancel.1).await;
    assert_eq!(answer["status"], 409, "{answer}");

    // The sweeper's schedule: a sweep's summary (B and C wait in the queue, unswept unless
    // their queue lease has lapsed meanwhile), and no dead-lettered work.
    let swept = invoke(sweeper.0, sweeper.1).await;
    assert!(
        swept["requeued"].is_u64() && swept["ended"].is_u64(),
        "{swept}"
    );
    assert_eq!(swept["dead_letters_ended"], 0, "{swept}");
    stack.assert_no_secret_in_output();
}

/// Every file in `events/` is one of [`EVENTS`].
fn assert_every_file_is_played() {
    for entry in std::fs::read_dir(crate::workspace_root().join("events")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            EVENTS.iter().any(|(_, file)| *file == name),
            "events/{name} is not played"
        );
    }
}
