//! An ordered parallel map: inputs are taken in order, processed on worker threads, and the
//! results handed to a sink in the same order. Used for the chunks of one object.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};

/// Runs `work` over the items produced by `next_input` on `threads` threads, with at most
/// `window` items in flight (read, being processed, or waiting to be written in order), and
/// passes results to `sink` in input order. The first error from any side stops the pipeline and
/// is returned.
///
/// With one thread (or a small object) everything runs on the caller's thread.
pub(crate) fn ordered_map<I, O, E>(
    threads: usize,
    window: usize,
    mut next_input: impl FnMut() -> Result<Option<I>, E>,
    work: impl Fn(I) -> Result<O, E> + Sync,
    mut sink: impl FnMut(O) -> Result<(), E>,
) -> Result<(), E>
where
    I: Send,
    O: Send,
    E: Send,
{
    if threads <= 1 {
        while let Some(item) = next_input()? {
            sink(work(item)?)?;
        }
        return Ok(());
    }
    // Take the first item before starting threads: most objects (metadata, small files) are one
    // chunk, and threads would only cost time.
    let Some(first) = next_input()? else {
        return Ok(());
    };
    let Some(second) = next_input()? else {
        return sink(work(first)?);
    };
    let window = window.max(threads);
    std::thread::scope(|scope| {
        // Jobs: bounded so the reader never runs more than `window` items ahead of the writer.
        let (job_tx, job_rx) = mpsc::sync_channel::<(u64, I)>(window);
        let job_rx = Arc::new(Mutex::new(job_rx));
        // Results: unbounded, but never holds more than `window` items since jobs are bounded.
        let (res_tx, res_rx) = mpsc::channel::<(u64, Result<O, E>)>();
        for _ in 0..threads {
            let job_rx = Arc::clone(&job_rx);
            let res_tx = res_tx.clone();
            let work = &work;
            scope.spawn(move || {
                loop {
                    // Hold the lock only to take a job; a poisoned lock means another worker
                    // panicked, and the pipeline is being torn down anyway.
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((seq, item)) = job else { return };
                    if res_tx.send((seq, work(item))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(res_tx);

        let mut pending: BTreeMap<u64, Result<O, E>> = BTreeMap::new();
        let mut queued = [first, second].into_iter();
        let mut next_seq = 0u64;
        let mut next_out = 0u64;
        let mut in_flight = 0usize;
        let mut input_done = false;
        loop {
            while !input_done && in_flight < window {
                let item = match queued.next() {
                    Some(item) => Some(item),
                    None => next_input()?,
                };
                match item {
                    Some(item) => {
                        if job_tx.send((next_seq, item)).is_err() {
                            // All workers are gone; their results (or the lack of them) end
                            // the loop below.
                            input_done = true;
                            break;
                        }
                        next_seq += 1;
                        in_flight += 1;
                    }
                    None => input_done = true,
                }
            }
            if in_flight == 0 {
                break;
            }
            let Ok((seq, result)) = res_rx.recv() else {
                break;
            };
            pending.insert(seq, result);
            while let Some(result) = pending.remove(&next_out) {
                in_flight -= 1;
                next_out += 1;
                sink(result?)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_stops_on_error() {
        for threads in [1, 2, 4] {
            let mut n = 0u32;
            let mut out = Vec::new();
            ordered_map(
                threads,
                3,
                || {
                    n += 1;
                    Ok::<_, String>((n <= 100).then_some(n))
                },
                |x| {
                    std::thread::sleep(std::time::Duration::from_micros(u64::from(x % 7) * 50));
                    Ok(x * 2)
                },
                |y| {
                    out.push(y);
                    Ok(())
                },
            )
            .expect("no error");
            assert_eq!(out, (1..=100).map(|x| x * 2).collect::<Vec<_>>());

            let mut n = 0u32;
            let err = ordered_map(
                threads,
                3,
                || {
                    n += 1;
                    Ok::<_, String>((n <= 100).then_some(n))
                },
                |x| {
                    if x == 50 {
                        Err(format!("bad {x}"))
                    } else {
                        Ok(x)
                    }
                },
                |_| Ok(()),
            )
            .unwrap_err();
            assert_eq!(err, "bad 50");
        }
    }
}
