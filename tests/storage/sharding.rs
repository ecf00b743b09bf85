//! The plan for sharding by account on a distributed PostgreSQL (Citus, distribution column
//! `account_id`; README "Scaling past one machine"), held against the schema the migrations
//! make: every table is in the plan, and the plan names exactly the tables that lack an
//! `account_id` column today and exactly the unique keys that do not include it. A migration
//! that adds a table or a key changes this list, and with it the plan.

use std::collections::BTreeSet;

use crate::support::{Backend, TestDb};

/// A table, whether it has `account_id` now, and its unique keys without it (name, what the
/// key becomes).
type Table = (&'static str, bool, &'static [(&'static str, &'static str)]);

/// Every table: whether it carries `account_id` today, and each unique key (primary keys,
/// unique constraints and unique indexes) without it, with what it becomes.
const PLAN: &[Table] = &[
    ("account", true, &[]),
    (
        "bucket",
        true,
        &[
            ("bucket_pkey", "(account_id, bucket_id)"),
            (
                "bucket_one_grant_per_business_key",
                "(account_id, business_key); stripe_fact keeps one grant per purchase",
            ),
        ],
    ),
    (
        "draw",
        false,
        &[("draw_pkey", "(account_id, hold_id, seq)")],
    ),
    ("entry", true, &[("entry_pkey", "(account_id, entry_id)")]),
    (
        "event",
        true,
        &[
            ("event_pkey", "(account_id, seq)"),
            (
                "event_once_per_endpoint",
                "(account_id, endpoint, event_id)",
            ),
            ("event_dedupe_once", "(account_id, endpoint, dedupe_key)"),
        ],
    ),
    (
        "event_endpoint",
        false,
        &[(
            "event_endpoint_pkey",
            "a reference table (replicated): a few rows",
        )],
    ),
    ("hold", true, &[("hold_pkey", "(account_id, hold_id)")]),
    (
        "idempotency_record",
        false,
        &[(
            "idempotency_record_pkey",
            "(account_id, caller, idempotency_key): a key is scoped to its account",
        )],
    ),
    (
        "stripe_charge",
        false,
        &[("stripe_charge_pkey", "(account_id, charge_id)")],
    ),
    (
        "stripe_customer",
        true,
        &[(
            "stripe_customer_customer_id_key",
            "a lookup table customer_id -> account_id, distributed by customer_id",
        )],
    ),
    (
        "stripe_dispute",
        false,
        &[("stripe_dispute_pkey", "(account_id, dispute_id)")],
    ),
    (
        "stripe_event",
        false,
        &[(
            "stripe_event_pkey",
            "(account_id, event_id), the account resolved before the claim",
        )],
    ),
    (
        "stripe_fact",
        true,
        &[("stripe_fact_pkey", "(account_id, business_key)")],
    ),
    (
        "stripe_subscription",
        true,
        &[("stripe_subscription_pkey", "(account_id, subscription_id)")],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sharding_plan_covers_every_table_and_key_without_account_id() {
    let db = TestDb::new(Backend::Postgres).await;
    let _store = db.store().await;
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();

    let tables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT c.relname::text,
                EXISTS (SELECT 1 FROM pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = 'account_id' AND NOT a.attisdropped)
         FROM pg_class c
         WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'
           AND c.relname NOT LIKE '\\_sqlx%'
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let planned: Vec<(String, bool)> = PLAN
        .iter()
        .map(|(t, has, _)| ((*t).to_owned(), *has))
        .collect();
    assert_eq!(
        tables, planned,
        "tables and their account_id column, as the migrations make them vs the plan"
    );

    let keys: BTreeSet<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, i.relname::text
         FROM pg_index x
         JOIN pg_class i ON i.oid = x.indexrelid
         JOIN pg_class c ON c.oid = x.indrelid
         WHERE c.relnamespace = 'public'::regnamespace AND x.indisunique
           AND c.relname NOT LIKE '\\_sqlx%'
           AND NOT EXISTS (SELECT 1 FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attname = 'account_id'
                             AND a.attnum = ANY(x.indkey))",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let planned: BTreeSet<(String, String)> = PLAN
        .iter()
        .flat_map(|(t, _, ks)| ks.iter().map(|(k, _)| ((*t).to_owned(), (*k).to_owned())))
        .collect();
    assert_eq!(
        keys, planned,
        "unique keys without account_id vs the plan's keys to change"
    );
}
