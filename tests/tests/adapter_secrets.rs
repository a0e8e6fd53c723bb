//! The Secrets Manager adapter against moto: the per-user JSON layout, the name encoding,
//! the cache, the CLI writes, plain secrets, and values kept out of errors and Debug.

use std::time::Duration;

use aws_sdk_secretsmanager::Client;
use longrun::Secret;
use longrun::ports::{PortError, SecretStore};
use longrun_aws::secrets::{
    self, DEFAULT_CACHE_TTL, SecretsManagerStore, delete_secret, get_plain, put_secret,
};
use longrun_tests::moto::Moto;
use serde_json::{Value, json};

const PREFIX: &str = "longrun-test";

async fn setup() -> Option<(Moto, Client)> {
    let moto = Moto::start().await?;
    let client = moto.secrets_client().await;
    Some((moto, client))
}

fn uncached(client: &Client) -> SecretsManagerStore {
    SecretsManagerStore::with_ttl(client.clone(), PREFIX, Duration::ZERO)
}

async fn stored_json(client: &Client, name: &str) -> Value {
    let text = client
        .get_secret_value()
        .secret_id(name)
        .send()
        .await
        .unwrap()
        .secret_string()
        .unwrap()
        .to_owned();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn put_then_get_round_trips_in_one_secret_per_user() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN two keys set for one user
    let key = Secret::new("sk-test-123");
    put_secret(&client, PREFIX, "text-tools", "u1", "openai_api_key", &key)
        .await
        .unwrap();
    put_secret(
        &client,
        PREFIX,
        "text-tools",
        "u1",
        "other",
        &Secret::new("v2"),
    )
    .await
    .unwrap();

    // WHEN the store reads them
    let store = SecretsManagerStore::new(client.clone(), PREFIX);
    let got = store
        .get("text-tools", "u1", "openai_api_key")
        .await
        .unwrap();

    // THEN the value comes back, an unknown key is None
    assert_eq!(got, Some(key));
    assert_eq!(
        store.get("text-tools", "u1", "other").await.unwrap(),
        Some(Secret::new("v2"))
    );
    assert_eq!(store.get("text-tools", "u1", "nope").await.unwrap(), None);
    // AND both keys live in one secret named {prefix}/{ext}/{user}, as a JSON object
    assert_eq!(
        stored_json(&client, "longrun-test/text-2Dtools/u1").await,
        json!({"openai_api_key": "sk-test-123", "other": "v2"})
    );
    let listed = client.list_secrets().send().await.unwrap();
    assert_eq!(listed.secret_list().len(), 1);
}

#[tokio::test]
async fn a_user_without_secrets_gets_none() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN no secret at all for this user
    let store = SecretsManagerStore::new(client.clone(), PREFIX);

    // WHEN a key is read THEN it is None, not an error
    assert_eq!(
        store
            .get("text-tools", "nobody", "openai_api_key")
            .await
            .unwrap(),
        None
    );
}

#[tokio::test]
async fn secrets_are_isolated_per_ext_and_user() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN u1 in text-tools has a key
    put_secret(
        &client,
        PREFIX,
        "text-tools",
        "u1",
        "k",
        &Secret::new("mine"),
    )
    .await
    .unwrap();
    let store = uncached(&client);

    // WHEN another user of that extension, or the same user in another extension, reads it
    // THEN they see nothing
    assert_eq!(store.get("text-tools", "u2", "k").await.unwrap(), None);
    assert_eq!(store.get("other-ext", "u1", "k").await.unwrap(), None);
    // AND ext/user cannot be shifted into one another through the separator
    assert_eq!(store.get("text-tools/u1", "", "k").await.unwrap(), None);
    assert_eq!(store.get("text", "tools/u1", "k").await.unwrap(), None);
    assert_eq!(
        store.get("text-tools", "u1", "k").await.unwrap(),
        Some(Secret::new("mine"))
    );
}

#[tokio::test]
async fn the_cache_serves_until_its_ttl_ends() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN a warm store (default 300 s TTL) and a store without cache, both having read "v1"
    put_secret(&client, PREFIX, "e", "u", "k", &Secret::new("v1"))
        .await
        .unwrap();
    let cached = SecretsManagerStore::new(client.clone(), PREFIX);
    let fresh = uncached(&client);
    assert_eq!(
        cached.get("e", "u", "k").await.unwrap(),
        Some(Secret::new("v1"))
    );
    assert_eq!(
        fresh.get("e", "u", "k").await.unwrap(),
        Some(Secret::new("v1"))
    );
    assert_eq!(DEFAULT_CACHE_TTL, Duration::from_secs(300));

    // WHEN another client (the CLI) changes the value
    put_secret(&client, PREFIX, "e", "u", "k", &Secret::new("v2"))
        .await
        .unwrap();

    // THEN the warm store still answers from its cache, the uncached one sees the change
    assert_eq!(
        cached.get("e", "u", "k").await.unwrap(),
        Some(Secret::new("v1"))
    );
    assert_eq!(
        fresh.get("e", "u", "k").await.unwrap(),
        Some(Secret::new("v2"))
    );
}

#[tokio::test]
async fn a_batch_of_one_users_tasks_reads_their_secret_once() {
    let Some((moto, client)) = setup().await else {
        return;
    };
    put_secret(&client, PREFIX, "e", "u1", "k", &Secret::new("v"))
        .await
        .unwrap();
    // GIVEN a cold store whose Secrets Manager requests are counted
    let counter = longrun_tests::counting::RequestCounter::default();
    let counted = counter.secrets(&moto.sdk_config().await);
    let store = SecretsManagerStore::new(counted, PREFIX);
    // WHEN ten tasks of u1 and ten of u2 (no secret) ask at the same moment
    let asks = (0..20).map(|i| {
        let store = &store;
        async move {
            store
                .get("e", if i % 2 == 0 { "u1" } else { "u2" }, "k")
                .await
        }
    });
    let answers = futures::future::join_all(asks).await;
    // THEN each user's secret was read once
    for (i, answer) in answers.into_iter().enumerate() {
        let expected = (i % 2 == 0).then(|| Secret::new("v"));
        assert_eq!(answer.unwrap(), expected);
    }
    assert_eq!(
        counter.snapshot(),
        [("secretsmanager.GetSecretValue".to_owned(), 2)].into()
    );
}

#[tokio::test]
async fn the_absence_of_secrets_is_cached_too() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN a warm store that found no secret for the user
    let cached = SecretsManagerStore::new(client.clone(), PREFIX);
    assert_eq!(cached.get("e", "u", "k").await.unwrap(), None);

    // WHEN the user connects a key afterwards
    put_secret(&client, PREFIX, "e", "u", "k", &Secret::new("v"))
        .await
        .unwrap();

    // THEN the warm store keeps answering None until its TTL ends (one call per TTL for a
    // user without secrets), while a fresh read finds the key
    assert_eq!(cached.get("e", "u", "k").await.unwrap(), None);
    assert_eq!(
        uncached(&client).get("e", "u", "k").await.unwrap(),
        Some(Secret::new("v"))
    );
}

#[tokio::test]
async fn delete_secret_removes_one_key_then_the_whole_secret() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN a user with two keys
    for (k, v) in [("a", "1"), ("b", "2")] {
        put_secret(&client, PREFIX, "e", "u", k, &Secret::new(v))
            .await
            .unwrap();
    }
    let store = uncached(&client);

    // WHEN one key is deleted
    assert!(delete_secret(&client, PREFIX, "e", "u", "a").await.unwrap());

    // THEN only that key is gone
    assert_eq!(store.get("e", "u", "a").await.unwrap(), None);
    assert_eq!(
        store.get("e", "u", "b").await.unwrap(),
        Some(Secret::new("2"))
    );
    // AND deleting a missing key reports false
    assert!(!delete_secret(&client, PREFIX, "e", "u", "a").await.unwrap());

    // WHEN the last key is deleted
    assert!(delete_secret(&client, PREFIX, "e", "u", "b").await.unwrap());

    // THEN the secret itself is gone (no longer billed), not merely emptied
    let err = client
        .get_secret_value()
        .secret_id("longrun-test/e/u")
        .send()
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .is_some_and(|e| e.is_resource_not_found_exception()),
        "{err:?}"
    );
    assert!(
        client
            .list_secrets()
            .include_planned_deletion(true)
            .send()
            .await
            .unwrap()
            .secret_list()
            .is_empty()
    );
    assert!(!delete_secret(&client, PREFIX, "e", "u", "b").await.unwrap());
    // AND a later set creates it afresh
    put_secret(&client, PREFIX, "e", "u", "c", &Secret::new("3"))
        .await
        .unwrap();
    assert_eq!(
        store.get("e", "u", "c").await.unwrap(),
        Some(Secret::new("3"))
    );
}

#[tokio::test]
async fn a_secret_scheduled_for_deletion_reads_as_absent_and_can_be_set_again() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN an operator deleted a user's secret in the console, with a recovery window
    put_secret(&client, PREFIX, "e", "u", "old", &Secret::new("x"))
        .await
        .unwrap();
    client
        .delete_secret()
        .secret_id("longrun-test/e/u")
        .recovery_window_in_days(7)
        .send()
        .await
        .unwrap();
    let store = uncached(&client);

    // WHEN the store reads it THEN the user has no secrets (not an error)
    assert_eq!(store.get("e", "u", "old").await.unwrap(), None);

    // WHEN a key is set again
    put_secret(&client, PREFIX, "e", "u", "new", &Secret::new("y"))
        .await
        .unwrap();

    // THEN the secret is back with only the new key: deleted keys stay deleted
    assert_eq!(
        stored_json(&client, "longrun-test/e/u").await,
        json!({"new": "y"})
    );
}

#[tokio::test]
async fn odd_user_ids_round_trip_without_colliding() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN two users whose ids differ only in characters secret names do not allow
    let odd = "ü ser#1/..";
    let similar = "ü ser#1/.-";
    put_secret(&client, PREFIX, "text-tools", odd, "k", &Secret::new("odd"))
        .await
        .unwrap();
    put_secret(
        &client,
        PREFIX,
        "text-tools",
        similar,
        "k",
        &Secret::new("similar"),
    )
    .await
    .unwrap();
    let store = uncached(&client);

    // WHEN each is read THEN each gets its own value
    assert_eq!(
        store.get("text-tools", odd, "k").await.unwrap(),
        Some(Secret::new("odd"))
    );
    assert_eq!(
        store.get("text-tools", similar, "k").await.unwrap(),
        Some(Secret::new("similar"))
    );
    // AND the stored names decode back to exactly those ids
    let listed = client.list_secrets().send().await.unwrap();
    let mut owners: Vec<(String, String)> = listed
        .secret_list()
        .iter()
        .filter_map(|s| secrets::parse_secret_name(PREFIX, s.name().unwrap_or_default()))
        .collect();
    owners.sort();
    assert_eq!(
        owners,
        vec![
            ("text-tools".to_owned(), similar.to_owned()),
            ("text-tools".to_owned(), odd.to_owned())
        ]
    );
}

#[tokio::test]
async fn an_overlong_name_is_refused_before_any_call() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN a user id whose encoded name exceeds 512 characters
    let user = "ü".repeat(100);

    // WHEN it is set or read THEN the error is permanent and says why
    let err = put_secret(&client, PREFIX, "e", &user, "k", &Secret::new("v"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PortError::Permanent(m) if m.contains("512")),
        "{err:?}"
    );
    let err = uncached(&client).get("e", &user, "k").await.unwrap_err();
    assert!(
        matches!(&err, PortError::Permanent(m) if m.contains("512")),
        "{err:?}"
    );
    assert!(
        client
            .list_secrets()
            .send()
            .await
            .unwrap()
            .secret_list()
            .is_empty()
    );
}

#[tokio::test]
async fn values_never_show_in_debug_or_errors() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    let value = "sk-live-DO-NOT-LEAK";
    // GIVEN a secret hand-edited into something that is not a JSON object of strings
    client
        .create_secret()
        .name("longrun-test/e/broken")
        .secret_string(format!("{{\"k\": {value}}}"))
        .send()
        .await
        .unwrap();
    client
        .create_secret()
        .name("longrun-test/e/number")
        .secret_string(json!({"k": value, "n": 42}).to_string())
        .send()
        .await
        .unwrap();
    let store = uncached(&client);

    // WHEN it is read
    let broken = store.get("e", "broken", "k").await.unwrap_err();
    let number = store.get("e", "number", "n").await.unwrap_err();

    // THEN the errors name the secret (and key) but never quote the value
    for err in [&broken, &number] {
        let shown = format!("{err:?} {err}");
        assert!(!shown.contains("DO-NOT-LEAK"), "{shown}");
        assert!(shown.contains("longrun-test/e/"), "{shown}");
    }
    assert!(format!("{number}").contains("\"n\""));
    // AND the other key of that secret still reads fine
    let secret = store.get("e", "number", "k").await.unwrap().unwrap();
    assert_eq!(secret.expose(), value);
    // AND a Secret prints as *** whichever way it is formatted
    let shown = format!("{secret:?} {secret} {:?}", Some(&secret));
    assert!(!shown.contains("DO-NOT-LEAK"), "{shown}");
    assert!(shown.contains("***"));
}

#[tokio::test]
async fn get_plain_reads_a_plain_string_secret() {
    let Some((_moto, client)) = setup().await else {
        return;
    };
    // GIVEN the chat API token stored as a plain string
    let created = client
        .create_secret()
        .name("longrun-test/chat-token")
        .secret_string("tok-123")
        .send()
        .await
        .unwrap();

    // WHEN it is read by name or by ARN THEN the value comes back whole
    assert_eq!(
        get_plain(&client, "longrun-test/chat-token").await.unwrap(),
        Some(Secret::new("tok-123"))
    );
    assert_eq!(
        get_plain(&client, created.arn().unwrap()).await.unwrap(),
        Some(Secret::new("tok-123"))
    );
    // AND a secret that does not exist is None
    assert_eq!(get_plain(&client, "longrun-test/none").await.unwrap(), None);
}
