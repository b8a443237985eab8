//! Rows the tests write and check: batches of wide rows whose WAL spans several segments, and a
//! fingerprint (count and checksum) to compare a restored cluster with its source.

use crate::cluster::Cluster;

/// Creates the test table.
pub fn create_table(c: &Cluster) {
    c.psql("create table t (id bigint not null, batch text not null, payload text not null)");
}

/// Inserts `rows` rows tagged `batch` in one transaction. Each row carries about 200 bytes of
/// payload, so a batch writes roughly `rows * 300` bytes of WAL (60 000 rows ≈ one 16 MiB
/// segment). Payloads are derived from `batch` and the row number: [`payload`] tells what a row
/// holds.
pub fn insert_batch(c: &Cluster, batch: &str, rows: u32) {
    assert!(
        batch.chars().all(|ch| ch.is_ascii_alphanumeric()),
        "batch tags are plain words"
    );
    c.psql(&format!(
        "insert into t select g, '{batch}', repeat(md5('{batch}' || g), 6) \
         from generate_series(1, {rows}) g"
    ));
}

/// The rows' fingerprint: per batch, the count and a checksum of every column.
pub fn fingerprint(c: &Cluster) -> String {
    c.psql(
        "select coalesce(string_agg(b, ', ' order by b), 'no rows') from (\
           select batch || ': ' || count(*) || ' rows, checksum ' || \
                  sum(hashtext(id::text || batch || payload)::bigint) as b \
           from t group by batch) s",
    )
}
