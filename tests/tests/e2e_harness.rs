//! The end-to-end harness itself: the fakes behave as the scenarios rely on, the player's
//! queues dead-letter as SQS does, and a stack comes up from `longrun bootstrap`.

use std::time::Duration;

use longrun_tests::dynamo::Dynoxide;
use longrun_tests::fake_chat::FakeChat;
use longrun_tests::fake_openai::{CallState, FakeOpenAi};
use longrun_tests::moto::Moto;
use serde_json::json;

#[tokio::test]
async fn the_fake_openai_server_scripts_by_directive_and_sees_dropped_calls() {
    let openai = FakeOpenAi::start().await.unwrap();
    openai.expect_key("sk-right");
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", openai.base_url);
    let body =
        |content: &str| json!({"model": "m", "messages": [{"role": "user", "content": content}]});

    let ok = http
        .post(&url)
        .bearer_auth("sk-right")
        .json(&body("hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let ok: serde_json::Value = ok.json().await.unwrap();
    assert_eq!(ok["choices"][0]["message"]["content"], "Refined: hello");

    let wrong_key = http
        .post(&url)
        .bearer_auth("sk-wrong")
        .json(&body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_key.status(), 401);

    for (directive, status) in [
        ("[[status=503]]", 503),
        ("[[malformed]]", 200),
        ("[[empty]]", 200),
    ] {
        let response = http
            .post(&url)
            .bearer_auth("sk-right")
            .json(&body(directive))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{directive}");
    }

    // A hung call whose client gives up is recorded as dropped.
    let hung = http
        .post(&url)
        .bearer_auth("sk-right")
        .json(&body("wait [[hang]]"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(hung.is_err());
    let calls =
        longrun_tests::eventually("the drop to be seen", Duration::from_secs(5), || async {
            let calls = openai.calls_with("[[hang]]");
            (calls.first().map(|c| c.state) == Some(CallState::Dropped)).then_some(calls)
        })
        .await;
    assert_eq!(calls.len(), 1);
    let all = openai.calls();
    assert_eq!(all.len(), 6);
    assert!(all[0].key_ok && !all[1].key_ok);
    assert_eq!(all[0].state, CallState::Answered);
}

#[tokio::test]
async fn the_fake_chat_honours_idempotency_keys_and_scripted_failures() {
    let chat = FakeChat::start().await.unwrap();
    chat.expect_token("tok");
    let http = reqwest::Client::new();
    let post = |key: &str, token: &str| {
        http.post(format!("{}/chats/c%2F1/messages", chat.url))
            .bearer_auth(token)
            .header("Idempotency-Key", key)
            .json(&json!({"kind": "result", "task_id": key.split(':').next(), "result": {"ok": true}}))
            .send()
    };
    assert_eq!(post("t1:result", "tok").await.unwrap().status(), 201);
    assert_eq!(post("t1:result", "tok").await.unwrap().status(), 409);
    assert_eq!(post("t2:result", "bad").await.unwrap().status(), 401);
    chat.fail_next(2);
    assert_eq!(post("t3:result", "tok").await.unwrap().status(), 500);
    assert_eq!(post("t3:result", "tok").await.unwrap().status(), 500);
    assert_eq!(post("t3:result", "tok").await.unwrap().status(), 201);
    let messages = chat.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].chat, "c/1");
    assert_eq!(chat.duplicates(), 1);
    assert_eq!(chat.unauthorized(), 1);
    assert_eq!(chat.attempts(), 6);
    assert_eq!(chat.results_for("t1").len(), 1);
}

#[tokio::test]
async fn bootstrap_puts_the_table_in_dynoxide_and_the_queues_in_moto() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    tokio::task::spawn_blocking(longrun_tests::build_stack_binaries)
        .await
        .unwrap()
        .unwrap();
    let dynoxide = Dynoxide::start().await.unwrap();
    let output = tokio::process::Command::new(longrun_tests::debug_binary("longrun"))
        .args(["bootstrap", "--prefix", "boot"])
        .env("AWS_ENDPOINT_URL_SQS", &moto.endpoint)
        .env("AWS_ENDPOINT_URL_SECRETS_MANAGER", &moto.endpoint)
        .env("AWS_ENDPOINT_URL_DYNAMODB", &dynoxide.endpoint)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tables = dynoxide.client().await.list_tables().send().await.unwrap();
    assert_eq!(tables.table_names(), ["boot-tasks"], "{stdout}");
    let queues = moto.sqs_client().await.list_queues().send().await.unwrap();
    assert_eq!(queues.queue_urls().len(), 4, "{stdout}");
}

/// Each batch a stand-in function was invoked with: (messageId, ApproximateReceiveCount).
type Batches = std::sync::Arc<std::sync::Mutex<Vec<Vec<(String, String)>>>>;

/// A stand-in function behind the Invoke API: records each batch and reports every record as
/// failed, so SQS keeps handing the message out.
async fn failing_function() -> (String, Batches) {
    use std::sync::Arc;
    let seen: Batches = Arc::default();
    let record = Arc::clone(&seen);
    let app = axum::Router::new().route(
        "/2015-03-31/functions/{name}/invocations",
        axum::routing::post(move |axum::Json(event): axum::Json<serde_json::Value>| {
            let record = Arc::clone(&record);
            async move {
                let batch: Vec<(String, String)> = event["Records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        assert_eq!(r["eventSource"], "aws:sqs");
                        assert!(r["receiptHandle"].is_string() && r["eventSourceARN"].is_string());
                        (
                            r["messageId"].as_str().unwrap().to_owned(),
                            r["attributes"]["ApproximateReceiveCount"]
                                .as_str()
                                .unwrap()
                                .to_owned(),
                        )
                    })
                    .collect();
                let failures: Vec<_> = batch
                    .iter()
                    .map(|(id, _)| json!({"itemIdentifier": id}))
                    .collect();
                record.lock().unwrap().push(batch);
                axum::Json(json!({"batchItemFailures": failures}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

#[tokio::test]
async fn the_player_redelivers_failures_and_sqs_dead_letters_after_max_receive_count() {
    use longrun_aws::sqs;
    use longrun_tests::esm::{Faults, Mapping, Player};
    let Some(moto) = Moto::start().await else {
        return;
    };
    let client = moto.sqs_client().await;
    let urls = sqs::ensure_queues(&client, "esm").await.unwrap();
    client
        .set_queue_attributes()
        .queue_url(&urls.delivery)
        .attributes(
            aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
            "1",
        )
        .send()
        .await
        .unwrap();
    let (endpoint, seen) = failing_function().await;
    let mut player = Player::new();
    player
        .map(
            client.clone(),
            longrun_tests::watch::Invoker::new(endpoint),
            Mapping {
                queue_url: urls.delivery.clone(),
                function: "delivery".into(),
                batch_size: 10,
                max_concurrency: 2,
                timeout: Duration::from_secs(5),
            },
        )
        .await
        .unwrap();
    // Every batch is delivered twice more, in reverse order.
    player.set_faults(
        "delivery",
        Faults {
            copies: 2,
            reorder: true,
            ..Faults::default()
        },
    );
    for body in ["{\"n\":1}", "{\"n\":2}"] {
        client
            .send_message()
            .queue_url(&urls.delivery)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }
    // THEN after maxReceiveCount (5) failed receives both messages are in the DLQ
    longrun_tests::eventually(
        "both messages dead-lettered",
        Duration::from_secs(60),
        || async { (sqs::depth(&client, &urls.delivery_dlq).await.unwrap() == 2).then_some(()) },
    )
    .await;
    let stats = player.stats("delivery").unwrap();
    assert_eq!(
        stats.dead_lettered, 0,
        "SQS (moto) moved them, not the player"
    );
    assert_eq!(stats.deleted, 0);
    drop(player);
    let seen = seen.lock().unwrap().clone();
    let mut counts: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for batch in &seen {
        for (id, count) in batch {
            counts.entry(id.clone()).or_default().push(count.clone());
        }
    }
    assert_eq!(counts.len(), 2, "{seen:?}");
    for (id, receives) in &counts {
        // Each receive was handed to the function three times (the original and 2 copies),
        // with the same message id and receive count, and receives went 1..=5.
        let mut distinct: Vec<u32> = receives.iter().map(|c| c.parse().unwrap()).collect();
        distinct.dedup();
        assert_eq!(distinct, vec![1, 2, 3, 4, 5], "{id}: {receives:?}");
        assert_eq!(receives.len(), 15, "{id}: {receives:?}");
    }
    assert_eq!(sqs::depth(&client, &urls.delivery).await.unwrap(), 0);
}
