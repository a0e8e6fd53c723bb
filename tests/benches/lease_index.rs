//! The task table's index write load while tasks run: every heartbeat is one UpdateItem of
//! the task record, and DynamoDB writes each index the update touches — two writes when an
//! index key moves (the old entry out, the new one in), one when only a projected attribute
//! changes, none otherwise — each billed by the entry's size in 1 KB write units, and each
//! landing on the index partition of the entry's partition key. One partition key takes at
//! most 1 000 write units a second.
//!
//! Measured through the real adapter on dynoxide: N tasks of S KB (10 a user, the default
//! per-user limit) are created and claimed, then each gets one heartbeat that carries
//! progress; the record is read back before and after, and the index writes are counted by
//! partition key for the shipped layout (`by-lease` over 16 keys, keys only; `by-user`
//! without params or lease attributes) and, from the same items, for the layout before it (one
//! `LEASE` key, both indexes projecting every attribute). At a 5 s heartbeat, each task writes
//! once every 5 s, so a key's write units per round divided by 5 is its rate.
//!
//! ```sh
//! cargo bench -p longrun-tests --bench lease_index                       # 10 000 × 5 KB
//! LONGRUN_BENCH_TASKS=2000 LONGRUN_BENCH_ITEM_KB=20 cargo bench -p longrun-tests --bench lease_index
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use chrono::{TimeZone, Utc};
use futures::StreamExt;
use longrun::ports::{Claim, TaskStore};
use longrun::task::{Lease, Progress, Task, TaskId, TaskKind, TaskState};
use longrun_aws::dynamodb::{
    BY_USER_ATTRIBUTES, DynamoTaskStore, GSI1_PK, GSI1_SK, GSI2_PK, GSI2_SK, LEASE_SHARDS, PK, SK,
    ensure_table,
};
use longrun_tests::dynamo::Dynoxide;
use serde_json::json;

type Item = HashMap<String, AttributeValue>;

/// DynamoDB's write limit on one partition key, in write units a second.
const PARTITION_LIMIT: f64 = 1000.0;
/// The production heartbeat period: each running task writes once per period.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// DynamoDB's per-entry overhead in a global secondary index, in bytes.
const INDEX_ENTRY_OVERHEAD: usize = 100;
/// How many requests are in flight at once.
const CONCURRENCY: usize = 32;

/// What an index holds of an item besides its keys.
#[derive(Clone, Copy)]
enum Projection {
    All,
    KeysOnly,
    Include(&'static [&'static str]),
}

/// One index of one layout.
struct Index {
    name: &'static str,
    pk: &'static str,
    sk: &'static str,
    projection: Projection,
    /// Replaces the item's partition key value (the old layout's single `LEASE` key).
    pk_value: Option<&'static str>,
}

struct Layout {
    name: &'static str,
    indexes: [Index; 2],
}

fn layouts() -> [Layout; 2] {
    [
        Layout {
            name: "before: one LEASE key, ALL projected",
            indexes: [
                Index {
                    name: "by-lease",
                    pk: GSI2_PK,
                    sk: GSI2_SK,
                    projection: Projection::All,
                    pk_value: Some("LEASE"),
                },
                Index {
                    name: "by-user",
                    pk: GSI1_PK,
                    sk: GSI1_SK,
                    projection: Projection::All,
                    pk_value: None,
                },
            ],
        },
        Layout {
            name: "shipped: 16 LEASE keys, projected for readers",
            indexes: [
                Index {
                    name: "by-lease",
                    pk: GSI2_PK,
                    sk: GSI2_SK,
                    projection: Projection::KeysOnly,
                    pk_value: None,
                },
                Index {
                    name: "by-user",
                    pk: GSI1_PK,
                    sk: GSI1_SK,
                    projection: Projection::Include(BY_USER_ATTRIBUTES),
                    pk_value: None,
                },
            ],
        },
    ]
}

/// DynamoDB's size of an attribute value, in bytes (its "Item sizes and formats" rules).
fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => {
            let digits = n.chars().filter(char::is_ascii_digit).count();
            digits.div_ceil(2) + 1
        }
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(set) => set.iter().map(String::len).sum(),
        AttributeValue::Ns(set) => set.iter().map(|n| n.len().div_ceil(2) + 1).sum(),
        AttributeValue::M(map) => {
            3 + map
                .iter()
                .map(|(k, v)| k.len() + value_size(v) + 1)
                .sum::<usize>()
        }
        AttributeValue::L(list) => 3 + list.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        _ => 0,
    }
}

fn item_size(item: &Item) -> usize {
    item.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}

/// Write units of one index entry.
fn units(entry: &Item) -> u64 {
    (item_size(entry) + INDEX_ENTRY_OVERHEAD).div_ceil(1024) as u64
}

/// The entry `index` holds for `item`: its partition key value and its attributes; `None`
/// when the item is not in the index (no key attributes).
fn entry(index: &Index, item: &Item) -> Option<(String, Item)> {
    let pk = item.get(index.pk)?.as_s().ok()?.clone();
    item.get(index.sk)?;
    let pk = index.pk_value.map_or(pk, str::to_owned);
    let keep = |name: &str| match index.projection {
        Projection::All => true,
        Projection::KeysOnly => [PK, SK, index.pk, index.sk].contains(&name),
        Projection::Include(names) => {
            [PK, SK, index.pk, index.sk].contains(&name) || names.contains(&name)
        }
    };
    let mut attrs: Item = item
        .iter()
        .filter(|(name, _)| keep(name))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    attrs.insert(index.pk.to_owned(), AttributeValue::S(pk.clone()));
    Some((pk, attrs))
}

/// The index writes one update from `old` to `new` costs: (partition key, write units).
fn index_writes(index: &Index, old: &Item, new: &Item) -> Vec<(String, u64)> {
    match (entry(index, old), entry(index, new)) {
        (None, None) => Vec::new(),
        (None, Some((pk, e))) | (Some((pk, e)), None) => vec![(pk, units(&e))],
        (Some((old_pk, o)), Some((new_pk, n))) => {
            if old_pk != new_pk || o.get(index.sk) != n.get(index.sk) {
                vec![(old_pk, units(&o)), (new_pk, units(&n))]
            } else if o != n {
                vec![(new_pk, units(&n))]
            } else {
                Vec::new()
            }
        }
    }
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn task(i: usize, item_kb: usize) -> Task {
    let at = Utc.with_ymd_and_hms(2030, 5, 1, 12, 0, 0).unwrap();
    // The rest of the record takes about 0.5 KB.
    let text = "x".repeat((item_kb * 1024).saturating_sub(512));
    Task {
        task_id: TaskId::generate(at),
        ext: "text-tools".into(),
        user: format!("user-{}", i / 10),
        chat: format!("chat-{}", i / 10),
        function: "refine_document".into(),
        kind: TaskKind::Function,
        event: Some("text_refined".into()),
        name: None,
        state: TaskState::Queued,
        progress: Progress::default(),
        progress_seq: 0,
        attempt: 0,
        cap_s: 1800,
        cancel_requested: false,
        created_at: at,
        wake_at: None,
        started_at: None,
        heartbeat_at: None,
        finished_at: None,
        delivered_at: None,
        redeliver_at: None,
        result: None,
        params: json!({"document": text}),
        lease: Some(Lease {
            owner: "queue".into(),
            until: at + chrono::Duration::seconds(120),
        }),
        request_id: None,
        isolated: false,
        partial: None,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env_number("LONGRUN_BENCH_TASKS", 10_000);
    let item_kb = env_number("LONGRUN_BENCH_ITEM_KB", 5);
    let dynamo = Dynoxide::start().await.expect("dynoxide");
    let client = dynamo.client().await;
    let table = "bench-lease-index";
    ensure_table(&client, table).await.expect("table");
    let store = DynamoTaskStore::new(client.clone(), table, Duration::from_secs(86_400));
    let started = Instant::now();
    println!("{n} running tasks of {item_kb} KB, 10 a user, on dynoxide through the adapter");

    let tasks: Vec<Task> = (0..n).map(|i| task(i, item_kb)).collect();
    let now = tasks[0].created_at;
    futures::stream::iter(&tasks)
        .for_each_concurrent(CONCURRENCY, |t| {
            let store = &store;
            async move {
                store.create(t, None, None).await.expect("create");
                let lease = Lease {
                    owner: format!("worker-{}", t.task_id),
                    until: now + chrono::Duration::seconds(60),
                };
                let claimed = store.claim(&t.task_id, &lease, now).await.expect("claim");
                assert!(matches!(claimed, Claim::Claimed(_)));
            }
        })
        .await;

    // One heartbeat round, each with news; the record before and after.
    let read = |id: TaskId| {
        let client = client.clone();
        async move {
            client
                .get_item()
                .table_name(table)
                .key(PK, AttributeValue::S(format!("TASK#{id}")))
                .key(SK, AttributeValue::S("TASK".into()))
                .consistent_read(true)
                .send()
                .await
                .expect("get")
                .item
                .expect("record")
        }
    };
    let at = now + chrono::Duration::seconds(5);
    let pairs: Vec<(Item, Item)> = futures::stream::iter(&tasks)
        .map(|t| {
            let store = &store;
            async move {
                let old = read(t.task_id.clone()).await;
                let lease = Lease {
                    owner: format!("worker-{}", t.task_id),
                    until: at + chrono::Duration::seconds(60),
                };
                let progress = Progress {
                    pct: 40,
                    message: "Refined chunk 4 of 10".into(),
                };
                store
                    .beat(&t.task_id, &lease, Some(&progress), None, at)
                    .await
                    .expect("beat");
                (old, read(t.task_id.clone()).await)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let base_units: u64 = pairs.iter().map(|(_, new)| units_of_item(new)).sum();

    println!(
        "\n{:<46} {:<9} {:>6} {:>12} {:>12} {:>11} {:>14}",
        "layout", "index", "keys", "hottest WU/s", "of 1 000", "all WU/s", "tasks at limit"
    );
    let mut hottest_by_layout = Vec::new();
    for layout in layouts() {
        let mut hottest_overall = 0.0_f64;
        for index in &layout.indexes {
            let mut by_key: HashMap<String, u64> = HashMap::new();
            for (old, new) in &pairs {
                for (pk, wu) in index_writes(index, old, new) {
                    *by_key.entry(pk).or_default() += wu;
                }
            }
            let period = HEARTBEAT.as_secs_f64();
            let hottest = by_key.values().copied().max().unwrap_or(0) as f64 / period;
            let all = by_key.values().sum::<u64>() as f64 / period;
            // Running tasks before the hottest key reaches the limit, at the same spread.
            let capacity = if hottest > 0.0 {
                format!("{:.0}", n as f64 * PARTITION_LIMIT / hottest)
            } else {
                "no limit".into()
            };
            println!(
                "{:<46} {:<9} {:>6} {:>12.0} {:>11.0}% {:>11.0} {:>14}",
                layout.name,
                index.name,
                by_key.len(),
                hottest,
                100.0 * hottest / PARTITION_LIMIT,
                all,
                capacity
            );
            if index.name == "by-lease" {
                hottest_overall = hottest;
            }
        }
        hottest_by_layout.push(hottest_overall);
    }
    println!(
        "\nby-lease's hottest key, shipped ÷ before = {:.3} ({} shards); the table's own writes: \
         {:.0} WU/s for all {n} tasks, the same in both layouts",
        hottest_by_layout[1] / hottest_by_layout[0],
        LEASE_SHARDS,
        base_units as f64 / HEARTBEAT.as_secs_f64()
    );
    println!(
        "goal: >= 10 000 running tasks with every index key under DynamoDB's {PARTITION_LIMIT:.0} \
         WU/s per partition key ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// Write units of a base-table write of `item`.
fn units_of_item(item: &Item) -> u64 {
    item_size(item).div_ceil(1024) as u64
}
