//! The SQS adapter against moto: queue layout, round trips of both wire messages, batch
//! sends, the size limit, dead-lettering, redrive and depth.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use longrun::ports::{DeliveryQueue, PortError, WorkQueue};
use longrun::task::{Progress, TaskId, TaskKind};
use longrun::wire::{DeliveryMessage, WorkMessage};
use longrun_aws::sqs::{
    self, DELIVERY_VISIBILITY_TIMEOUT_S, DLQ_RETENTION_S, MAX_MESSAGE_BYTES, MAX_RECEIVE_COUNT,
    QUEUE_RETENTION_S, QueueUrls, SqsDeliveryQueue, SqsWorkQueue, WORK_VISIBILITY_TIMEOUT_S,
};
use longrun_tests::moto::{self, Moto};
use serde_json::{Value, json};

use aws_sdk_sqs::types::QueueAttributeName;

async fn setup() -> Option<(Moto, aws_sdk_sqs::Client, QueueUrls)> {
    let moto = Moto::start().await?;
    let client = moto.sqs_client().await;
    let urls = sqs::ensure_queues(&client, "lr-test").await.unwrap();
    Some((moto, client, urls))
}

fn work_message(params: Value) -> WorkMessage {
    let created_at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    WorkMessage {
        task_id: TaskId::generate(created_at),
        ext: "text-tools".into(),
        user: "u1".into(),
        chat: "c1".into(),
        function: "refine_output".into(),
        kind: TaskKind::Function,
        event: Some("text_refined".into()),
        name: None,
        params,
        cap_s: 180,
        created_at,
        request_id: Some("r1".into()),
        isolated: false,
        carry_on: false,
    }
}

async fn attributes(
    client: &aws_sdk_sqs::Client,
    url: &str,
) -> std::collections::HashMap<QueueAttributeName, String> {
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .unwrap()
        .attributes()
        .cloned()
        .unwrap_or_default()
}

/// Receives until `n` messages came or 10 s passed, deleting each.
async fn drain(client: &aws_sdk_sqs::Client, url: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut bodies = Vec::new();
    while bodies.len() < n && Instant::now() < deadline {
        for m in sqs::receive(client, url, 10, 1, None).await.unwrap() {
            sqs::delete(client, url, &m.receipt_handle).await.unwrap();
            bodies.push(m.body);
        }
    }
    bodies
}

#[tokio::test]
async fn ensure_queues_is_idempotent_and_sets_the_template_attributes() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let client = moto.sqs_client().await;

    // GIVEN queues already created once
    let first = sqs::ensure_queues(&client, "lr-test").await.unwrap();
    // WHEN bootstrap runs again
    let second = sqs::ensure_queues(&client, "lr-test").await.unwrap();

    // THEN it finds the same four queues
    assert_eq!(first, second);
    assert!(first.work.ends_with("/lr-test-work"), "{}", first.work);
    assert!(first.work_dlq.ends_with("/lr-test-work-dlq"));
    assert!(first.delivery.ends_with("/lr-test-delivery"));
    assert!(first.delivery_dlq.ends_with("/lr-test-delivery-dlq"));

    // AND each main queue has the template's visibility, retention, size limit and redrive to
    // its own DLQ
    for (url, dlq, visibility) in [
        (&first.work, &first.work_dlq, WORK_VISIBILITY_TIMEOUT_S),
        (
            &first.delivery,
            &first.delivery_dlq,
            DELIVERY_VISIBILITY_TIMEOUT_S,
        ),
    ] {
        let attrs = attributes(&client, url).await;
        assert_eq!(
            attrs[&QueueAttributeName::VisibilityTimeout],
            visibility.to_string()
        );
        assert_eq!(
            attrs[&QueueAttributeName::MessageRetentionPeriod],
            QUEUE_RETENTION_S.to_string()
        );
        assert_eq!(
            attrs[&QueueAttributeName::MaximumMessageSize],
            MAX_MESSAGE_BYTES.to_string()
        );
        let policy: Value =
            serde_json::from_str(&attrs[&QueueAttributeName::RedrivePolicy]).unwrap();
        let dlq_arn = sqs::queue_arn(&client, dlq).await.unwrap();
        assert_eq!(policy["deadLetterTargetArn"], json!(dlq_arn));
        // maxReceiveCount comes back as a number or a string depending on the service version.
        let max: u32 = match &policy["maxReceiveCount"] {
            Value::Number(n) => n.as_u64().unwrap() as u32,
            Value::String(s) => s.parse().unwrap(),
            other => panic!("maxReceiveCount is {other}"),
        };
        assert_eq!(max, MAX_RECEIVE_COUNT);

        let dlq_attrs = attributes(&client, dlq).await;
        assert_eq!(
            dlq_attrs[&QueueAttributeName::MessageRetentionPeriod],
            DLQ_RETENTION_S.to_string()
        );
        assert_eq!(
            dlq_attrs[&QueueAttributeName::MaximumMessageSize],
            MAX_MESSAGE_BYTES.to_string()
        );
        assert!(!dlq_attrs.contains_key(&QueueAttributeName::RedrivePolicy));
    }
    // AND the numbers are the ones AWS's guidance gives for the function timeouts
    assert_eq!(WORK_VISIBILITY_TIMEOUT_S, 5400);
    assert_eq!(DELIVERY_VISIBILITY_TIMEOUT_S, 180);
    assert_eq!((QUEUE_RETENTION_S, DLQ_RETENTION_S), (345_600, 1_209_600));
}

#[tokio::test]
async fn ensure_queues_brings_a_drifted_queue_back_to_the_template() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN an operator changed the work queue's visibility timeout by hand
    client
        .set_queue_attributes()
        .queue_url(&urls.work)
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .unwrap();

    // WHEN bootstrap runs again
    let again = sqs::ensure_queues(&client, "lr-test").await.unwrap();

    // THEN it succeeds and the queue has the template's value again
    assert_eq!(again, urls);
    let attrs = attributes(&client, &urls.work).await;
    assert_eq!(attrs[&QueueAttributeName::VisibilityTimeout], "5400");
}

#[tokio::test]
async fn a_work_message_round_trips() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN a work message with nested params and unicode
    let message = work_message(json!({"input": "naïve “text” 🎉", "n": [1, 2, {"k": null}]}));

    // WHEN the work queue sends it and a consumer receives it
    SqsWorkQueue::new(client.clone(), &urls.work)
        .send(&message)
        .await
        .unwrap();
    let received = sqs::receive(&client, &urls.work, 10, 2, None)
        .await
        .unwrap();

    // THEN exactly that message arrives, received once
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].receive_count, 1);
    let back: WorkMessage = serde_json::from_str(&received[0].body).unwrap();
    assert_eq!(back, message);
}

#[tokio::test]
async fn a_delayed_work_message_is_held_back_by_the_queue() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN a work message sent with a 3 s delay (a sleeping task's wake-up)
    let message = work_message(json!({}));
    SqsWorkQueue::new(client.clone(), &urls.work)
        .send_after(&message, Duration::from_millis(2_500))
        .await
        .unwrap();
    // WHEN a consumer polls at once, THEN it gets nothing
    let early = sqs::receive(&client, &urls.work, 10, 1, None)
        .await
        .unwrap();
    assert!(early.is_empty(), "{early:?}");
    // AND once the delay is over the message arrives
    let mut received = Vec::new();
    for _ in 0..10 {
        received = sqs::receive(&client, &urls.work, 10, 1, None)
            .await
            .unwrap();
        if !received.is_empty() {
            break;
        }
    }
    assert_eq!(received.len(), 1);
    let back: WorkMessage = serde_json::from_str(&received[0].body).unwrap();
    assert_eq!(back, message);
}

#[test]
fn delays_are_whole_seconds_rounded_up_to_the_queue_limit() {
    assert_eq!(sqs::delay_seconds(Duration::ZERO), 0);
    assert_eq!(sqs::delay_seconds(Duration::from_millis(2_500)), 3);
    assert_eq!(sqs::delay_seconds(Duration::from_secs(900)), 900);
    assert_eq!(sqs::delay_seconds(Duration::from_secs(5_000)), 900);
}

#[tokio::test]
async fn delivery_messages_round_trip() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN a result and a progress delivery message
    let task_id = TaskId::generate(Utc::now());
    let messages = vec![
        DeliveryMessage::Result {
            task_id: task_id.clone(),
        },
        DeliveryMessage::Progress {
            task_id,
            seq: 7,
            progress: Progress {
                pct: 40,
                message: "halfway — almost".into(),
            },
        },
    ];
    let queue = SqsDeliveryQueue::new(
        client.clone(),
        &urls.delivery,
        Some(urls.delivery_dlq.clone()),
    );

    // WHEN both are sent and received
    for m in &messages {
        queue.send(m).await.unwrap();
    }
    let bodies = drain(&client, &urls.delivery, 2).await;

    // THEN both parse back to the messages sent (a standard queue need not keep order)
    let mut back: Vec<DeliveryMessage> = bodies
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    back.sort_by_key(|m| m.idempotency_key());
    let mut sent = messages.clone();
    sent.sort_by_key(|m| m.idempotency_key());
    assert_eq!(back, sent);
}

#[tokio::test]
async fn send_batch_sends_25_messages_in_three_requests() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN 25 distinct bodies (more than one 10-entry batch)
    let bodies: Vec<String> = (0..25).map(|i| json!({"n": i}).to_string()).collect();

    // WHEN they are sent as a batch
    sqs::send_batch(&client, &urls.work, &bodies).await.unwrap();

    // THEN the queue holds all 25, each once
    assert_eq!(sqs::depth(&client, &urls.work).await.unwrap(), 25);
    let received: BTreeSet<String> = drain(&client, &urls.work, 25).await.into_iter().collect();
    assert_eq!(received, bodies.into_iter().collect::<BTreeSet<_>>());
    assert_eq!(sqs::depth(&client, &urls.work).await.unwrap(), 0);
}

#[tokio::test]
async fn an_oversize_body_is_refused_without_a_request() {
    // GIVEN an "SQS endpoint" that only records connections
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let client = moto::sqs_client(&endpoint).await;
    let url = format!("{endpoint}/123456789012/lr-test-work");
    // AND a work message whose JSON is over 1 MiB
    let huge = work_message(json!({"input": "x".repeat(MAX_MESSAGE_BYTES)}));

    // WHEN the work queue, a delivery dead-letter and a batch try to send it
    let single = SqsWorkQueue::new(client.clone(), &url).send(&huge).await;
    let batch = sqs::send_batch(
        &client,
        &url,
        &["small".to_owned(), "y".repeat(MAX_MESSAGE_BYTES + 1)],
    )
    .await;

    // THEN each fails as permanent, naming the limit
    for result in [single, batch] {
        match result {
            Err(PortError::Permanent(m)) => assert!(m.contains("1048576"), "{m}"),
            other => panic!("expected a permanent error, got {other:?}"),
        }
    }
    // AND no connection was ever made (not even for the small body of the batch)
    assert!(matches!(
        listener.accept(),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    ));
}

#[tokio::test]
async fn a_body_of_exactly_one_mib_is_accepted() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN a body exactly at the limit
    let body = "z".repeat(MAX_MESSAGE_BYTES);

    // WHEN it is sent as a batch of one
    sqs::send_batch(&client, &urls.work, std::slice::from_ref(&body))
        .await
        .unwrap();

    // THEN it arrives whole
    let received = drain(&client, &urls.work, 1).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].len(), MAX_MESSAGE_BYTES);
}

#[tokio::test]
async fn dead_letter_lands_in_the_delivery_dlq() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN a delivery message that can never be delivered
    let message = DeliveryMessage::Result {
        task_id: TaskId::generate(Utc::now()),
    };
    let queue = SqsDeliveryQueue::new(
        client.clone(),
        &urls.delivery,
        Some(urls.delivery_dlq.clone()),
    );

    // WHEN it is dead-lettered
    queue.dead_letter(&message).await.unwrap();

    // THEN it is in the DLQ, not in the delivery queue
    assert_eq!(sqs::depth(&client, &urls.delivery).await.unwrap(), 0);
    let parked = drain(&client, &urls.delivery_dlq, 1).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        serde_json::from_str::<DeliveryMessage>(&parked[0]).unwrap(),
        message
    );
}

#[tokio::test]
async fn dead_letter_without_a_dlq_names_the_missing_variable() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN a delivery queue configured without LONGRUN_DELIVERY_DLQ_URL
    let queue = SqsDeliveryQueue::new(client.clone(), &urls.delivery, None);

    // WHEN a message is dead-lettered
    let err = queue
        .dead_letter(&DeliveryMessage::Result {
            task_id: TaskId::generate(Utc::now()),
        })
        .await
        .unwrap_err();

    // THEN the error is permanent and says what to configure, and nothing was sent anywhere
    assert!(
        matches!(&err, PortError::Permanent(m) if m.contains("LONGRUN_DELIVERY_DLQ_URL")),
        "{err:?}"
    );
    assert_eq!(sqs::depth(&client, &urls.delivery).await.unwrap(), 0);
    assert_eq!(sqs::depth(&client, &urls.delivery_dlq).await.unwrap(), 0);
}

#[tokio::test]
async fn redrive_moves_every_dlq_message_back() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN 13 messages in the work DLQ (more than one receive batch)
    let bodies: Vec<String> = (0..13).map(|i| json!({"dead": i}).to_string()).collect();
    sqs::send_batch(&client, &urls.work_dlq, &bodies)
        .await
        .unwrap();

    // WHEN they are redriven to the work queue
    let moved = sqs::redrive(&client, &urls.work_dlq, &urls.work, 100)
        .await
        .unwrap();

    // THEN all 13 moved, the DLQ is empty (none visible, none in flight) and the work queue
    // holds exactly those bodies
    assert_eq!(moved, 13);
    let dlq = attributes(&client, &urls.work_dlq).await;
    assert_eq!(dlq[&QueueAttributeName::ApproximateNumberOfMessages], "0");
    assert_eq!(
        dlq[&QueueAttributeName::ApproximateNumberOfMessagesNotVisible],
        "0"
    );
    let back: BTreeSet<String> = drain(&client, &urls.work, 13).await.into_iter().collect();
    assert_eq!(back, bodies.into_iter().collect::<BTreeSet<_>>());
}

#[tokio::test]
async fn redrive_stops_at_max() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN 13 messages in the delivery DLQ
    let bodies: Vec<String> = (0..13).map(|i| json!({"dead": i}).to_string()).collect();
    sqs::send_batch(&client, &urls.delivery_dlq, &bodies)
        .await
        .unwrap();

    // WHEN at most 5 are redriven
    let moved = sqs::redrive(&client, &urls.delivery_dlq, &urls.delivery, 5)
        .await
        .unwrap();

    // THEN 5 moved and 8 wait, visible, in the DLQ
    assert_eq!(moved, 5);
    assert_eq!(sqs::depth(&client, &urls.delivery).await.unwrap(), 5);
    assert_eq!(sqs::depth(&client, &urls.delivery_dlq).await.unwrap(), 8);
}

#[tokio::test]
async fn a_message_received_too_often_moves_to_the_dlq() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN a poison work message
    let message = work_message(json!({"poison": true}));
    SqsWorkQueue::new(client.clone(), &urls.work)
        .send(&message)
        .await
        .unwrap();

    // WHEN a consumer fails it maxReceiveCount times (visibility 0: it is back at once)
    for attempt in 1..=MAX_RECEIVE_COUNT {
        let received = sqs::receive(&client, &urls.work, 1, 1, Some(0))
            .await
            .unwrap();
        assert_eq!(received.len(), 1, "receive {attempt}");
        assert_eq!(received[0].receive_count, attempt);
    }
    // AND the queue is polled once more
    let after = sqs::receive(&client, &urls.work, 1, 1, Some(0))
        .await
        .unwrap();

    // THEN SQS moved it to the DLQ instead of handing it out a sixth time
    assert!(after.is_empty(), "{after:?}");
    let parked = drain(&client, &urls.work_dlq, 1).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        serde_json::from_str::<WorkMessage>(&parked[0]).unwrap(),
        message
    );
}

#[tokio::test]
async fn depth_counts_waiting_messages_only() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN an empty queue
    assert_eq!(sqs::depth(&client, &urls.work).await.unwrap(), 0);

    // WHEN 3 messages are sent and 1 is taken (in flight, not deleted)
    let bodies: Vec<String> = (0..3).map(|i| i.to_string()).collect();
    sqs::send_batch(&client, &urls.work, &bodies).await.unwrap();
    assert_eq!(sqs::depth(&client, &urls.work).await.unwrap(), 3);
    let taken = sqs::receive(&client, &urls.work, 1, 0, Some(60))
        .await
        .unwrap();
    assert_eq!(taken.len(), 1);

    // THEN depth counts the 2 still waiting
    assert_eq!(sqs::depth(&client, &urls.work).await.unwrap(), 2);
    // AND after deleting the taken one it is gone for good
    sqs::delete(&client, &urls.work, &taken[0].receipt_handle)
        .await
        .unwrap();
    assert_eq!(drain(&client, &urls.work, 2).await.len(), 2);
    assert_eq!(sqs::depth(&client, &urls.work).await.unwrap(), 0);
}

#[tokio::test]
async fn a_missing_queue_is_not_found() {
    let Some((_moto, client, urls)) = setup().await else {
        return;
    };
    // GIVEN a URL of a queue that does not exist
    let missing = urls.work.replace("lr-test-work", "lr-test-nope");

    // WHEN a message is sent to it
    let err = SqsWorkQueue::new(client, missing)
        .send(&work_message(Value::Null))
        .await
        .unwrap_err();

    // THEN the pipeline sees "not found", not a retryable failure
    assert!(matches!(err, PortError::NotFound(_)), "{err:?}");
}
