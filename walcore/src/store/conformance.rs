//! The behaviour every store must have, as one suite run against every backend: the local
//! file system here, S3 (the emulator) in the end-to-end tests. Not part of the stable API.

use super::{PutOutcome, Store, StoreError};
use crate::error::{Error, ErrorKind};

fn fail(what: impl Into<String>) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!("store conformance: {}", what.into()),
    )
}

async fn put(store: &Store, key: &str, bytes: Vec<u8>) -> Result<PutOutcome, Error> {
    let (outcome, ()) = store
        .put_create_with(key, move |w| {
            w.write_all(&bytes)
                .map_err(|e| Error::new(ErrorKind::LocalIo, e.to_string()))
        })
        .await?;
    Ok(outcome)
}

/// Runs the suite in `store`, under keys starting with `prefix` (which must be unused).
#[doc(hidden)]
pub async fn run(store: &Store, prefix: &str) -> Result<(), Error> {
    let k = |s: &str| format!("{prefix}/{s}");

    // Absent objects are `NotFound`, from every read path.
    match store.get(&k("absent")).await {
        Err(StoreError::NotFound) => {}
        other => return Err(fail(format!("get of an absent key gave {other:?}"))),
    }
    match store.open_reader(&k("absent")).await {
        Err(StoreError::NotFound) => {}
        Err(e) => return Err(fail(format!("open_reader of an absent key gave {e:?}"))),
        Ok(_) => return Err(fail("open_reader of an absent key succeeded")),
    }
    if store
        .head(&k("absent"))
        .await
        .map_err(|e| fail(e.to_string()))?
        .is_some()
    {
        return Err(fail("head of an absent key found something"));
    }

    // The tail of an object (a trailer, without the body), and of one shorter than asked.
    match store.tail(&k("absent"), 20).await {
        Err(StoreError::NotFound) => {}
        other => return Err(fail(format!("tail of an absent key gave {other:?}"))),
    }
    put(store, &k("t/long"), (0u8..100).collect()).await?;
    let tail = store
        .tail(&k("t/long"), 20)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if tail[..] != (80u8..100).collect::<Vec<_>>()[..] {
        return Err(fail(format!("tail of 20 bytes gave {tail:?}")));
    }
    put(store, &k("t/short"), b"tiny".to_vec()).await?;
    let tail = store
        .tail(&k("t/short"), 20)
        .await
        .map_err(|e| fail(e.to_string()))?;
    if tail[..] != b"tiny"[..] {
        return Err(fail(format!("tail of a 4-byte object gave {tail:?}")));
    }

    // Create-only: the first write wins, the second changes nothing.
    if put(store, &k("a/one"), b"first".to_vec()).await? != PutOutcome::Created {
        return Err(fail("first write did not create"));
    }
    if put(store, &k("a/one"), b"second!".to_vec()).await? != PutOutcome::AlreadyExists {
        return Err(fail(
            "second write to the same key did not report AlreadyExists",
        ));
    }
    let got = store
        .get(&k("a/one"))
        .await
        .map_err(|e| fail(e.to_string()))?;
    if &got[..] != b"first" {
        return Err(fail(format!(
            "the object changed after a refused write: {got:?}"
        )));
    }
    if store
        .head(&k("a/one"))
        .await
        .map_err(|e| fail(e.to_string()))?
        != Some(5)
    {
        return Err(fail("head does not give the object's size"));
    }

    // Streaming reads return the same bytes, including for an object of several pieces.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    put(store, &k("b/big"), big.clone()).await?;
    let reader = store
        .open_reader(&k("b/big"))
        .await
        .map_err(|e| fail(e.to_string()))?;
    let read = tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut v).map(|_| v)
    })
    .await
    .map_err(|e| fail(e.to_string()))?
    .map_err(|e| fail(e.to_string()))?;
    if read != big {
        return Err(fail("streamed read differs from what was written"));
    }
    let whole = store
        .get(&k("b/big"))
        .await
        .map_err(|e| fail(e.to_string()))?;
    if whole[..] != big[..] {
        return Err(fail("a whole-object read of several pieces differs"));
    }

    // A failing producer leaves no object behind.
    let r = store
        .put_create_with(&k("c/failed"), |w| {
            w.write_all(b"partial")
                .map_err(|e| Error::new(ErrorKind::LocalIo, e.to_string()))?;
            Err::<(), _>(Error::new(ErrorKind::InvalidInput, "producer failed"))
        })
        .await;
    if r.is_ok() {
        return Err(fail("a failing producer was reported as success"));
    }
    if store
        .head(&k("c/failed"))
        .await
        .map_err(|e| fail(e.to_string()))?
        .is_some()
    {
        return Err(fail("a failing producer left an object"));
    }

    // Objects larger than one request (multipart uploads on clouds) behave the same, and a
    // producer failing after several parts leaves nothing.
    let huge: Vec<u8> = (0..(super::remote::SINGLE_PUT_MAX + 3_000_000) as u32)
        .map(|i| (i % 251) as u8)
        .collect();
    let expected_len = huge.len() as u64;
    if put(store, &k("d/huge"), huge).await? != PutOutcome::Created {
        return Err(fail("a large object was not created"));
    }
    if store
        .head(&k("d/huge"))
        .await
        .map_err(|e| fail(e.to_string()))?
        != Some(expected_len)
    {
        return Err(fail("a large object has the wrong size"));
    }
    if put(store, &k("d/huge"), vec![1; 10]).await? != PutOutcome::AlreadyExists {
        return Err(fail(
            "a small write over a large object did not report AlreadyExists",
        ));
    }
    let r = store
        .put_create_with(&k("d/failed-huge"), |w| {
            let block = vec![7u8; 1 << 20];
            for _ in 0..(super::remote::SINGLE_PUT_MAX >> 20) + 4 {
                w.write_all(&block)
                    .map_err(|e| Error::new(ErrorKind::LocalIo, e.to_string()))?;
            }
            Err::<(), _>(Error::new(ErrorKind::InvalidInput, "producer failed late"))
        })
        .await;
    match r {
        Err(e) if e.message().contains("producer failed late") => {}
        other => return Err(fail(format!("a late producer failure gave {other:?}"))),
    }
    if store
        .head(&k("d/failed-huge"))
        .await
        .map_err(|e| fail(e.to_string()))?
        .is_some()
    {
        return Err(fail(
            "a producer failing after several parts left an object",
        ));
    }

    // Listings are sorted keys under the prefix, nothing else.
    let listed = store.list(prefix).await.map_err(|e| fail(e.to_string()))?;
    let want = vec![
        k("a/one"),
        k("b/big"),
        k("d/huge"),
        k("t/long"),
        k("t/short"),
    ];
    if listed != want {
        return Err(fail(format!("list gave {listed:?}, expected {want:?}")));
    }

    // The first keys after a position (present or not), in key order, at most as many as asked.
    let cases: [(String, Option<String>, usize, Vec<String>); 5] = [
        (prefix.to_string(), None, 2, vec![k("a/one"), k("b/big")]),
        (
            prefix.to_string(),
            Some(k("b/big")),
            2,
            vec![k("d/huge"), k("t/long")],
        ),
        (prefix.to_string(), Some(k("c")), 1, vec![k("d/huge")]),
        (prefix.to_string(), Some(k("t/short")), 10, vec![]),
        (k("t/"), Some(k("t/a")), 10, vec![k("t/long"), k("t/short")]),
    ];
    for (under, after, limit, want) in cases {
        let got = store
            .list_after(&under, after.as_deref(), limit)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if got != want {
            return Err(fail(format!(
                "list_after({under}, {after:?}, {limit}) gave {got:?}, expected {want:?}"
            )));
        }
    }

    // Deleting removes an object (its key can be created again); deleting nothing is fine.
    let gone = |e: StoreError| fail(format!("delete: {e}"));
    store.delete(&k("t/short")).await.map_err(gone)?;
    store.delete(&k("t/short")).await.map_err(gone)?;
    store.delete(&k("never-there")).await.map_err(gone)?;
    if store
        .head(&k("t/short"))
        .await
        .map_err(|e| fail(e.to_string()))?
        .is_some()
    {
        return Err(fail("a deleted object is still there"));
    }
    if put(store, &k("t/short"), vec![9]).await? != PutOutcome::Created {
        return Err(fail("a deleted key could not be created again"));
    }

    // One level of the key space: directories and objects with their sizes.
    let scan = |e: StoreError| fail(format!("scan: {e}"));
    // A file system may keep the directory of a failed write ("c"); object stores have none.
    let mut dirs = store.child_dirs(prefix).await.map_err(scan)?;
    dirs.retain(|d| d != "c");
    if dirs != ["a", "b", "d", "t"] {
        return Err(fail(format!("child_dirs({prefix}) gave {dirs:?}")));
    }
    let objects = store.list_dir(&k("t")).await.map_err(scan)?;
    let keys: Vec<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    if keys != [k("t/long"), k("t/short")] || objects[1].size == 0 {
        return Err(fail(format!("list_dir({}) gave {objects:?}", k("t"))));
    }

    // Deleting many at once, across S3's 1000-key batches, absent keys included.
    let many: Vec<String> = (0..1003).map(|i| k(&format!("m/{i:04}"))).collect();
    for key in &many {
        put(store, key, vec![1]).await?;
    }
    let mut doomed = many[..1002].to_vec();
    doomed.push(k("m/never-there"));
    store
        .delete_many(&doomed)
        .await
        .map_err(|e| fail(format!("delete_many: {e}")))?;
    let left = store
        .list(&k("m/"))
        .await
        .map_err(|e| fail(e.to_string()))?;
    if left != many[1002..] {
        return Err(fail(format!("after delete_many, {left:?} remain")));
    }
    store
        .delete_many(&[])
        .await
        .map_err(|e| fail(e.to_string()))?;

    // Every object below a prefix, at any depth, with sizes and times.
    let all = store.list_info(&k("t")).await.map_err(scan)?;
    let keys: Vec<&str> = all.iter().map(|o| o.key.as_str()).collect();
    if keys != [k("t/long"), k("t/short")] || all[1].size != objects[1].size {
        return Err(fail(format!("list_info({}) gave {all:?}", k("t"))));
    }
    let deep = store.list_info(&k("a")).await.map_err(scan)?;
    if deep.is_empty() || !deep.iter().all(|o| o.key.starts_with(&k("a/"))) {
        return Err(fail(format!("list_info({}) gave {deep:?}", k("a"))));
    }
    // Pruning empty directories leaves every object where it is.
    let before = store.list(prefix).await.map_err(|e| fail(e.to_string()))?;
    store
        .prune_empty_dirs(&k("m/"))
        .await
        .map_err(|e| fail(format!("prune_empty_dirs: {e}")))?;
    if store.list(prefix).await.map_err(|e| fail(e.to_string()))? != before {
        return Err(fail("prune_empty_dirs removed an object"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn local_store_conforms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().display());
        let store = super::Store::from_url(&url, &Default::default()).expect("store");
        super::run(&store, "conf").await.expect("conformance");
    }
}
