//! The CPU side of a base backup, on a real `base.tar` (pgbench, scale 5): what `take` does to
//! each archive (encode: zstd, AES-256-GCM, framing, on the codec's threads), what `restore`
//! does before the disk (decode and tar parsing), and the tar reader alone. The disk and the
//! network are left out; `benches/basebackup-vs-tools.sh` times whole commands.

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use walcore::backup::tar::{Entry, TarError, TarReader, TarSink};
use walcore::codec::{Codec, Compression, MasterKey};

struct Setup {
    tar: Vec<u8>,
    variants: Vec<(&'static str, Codec, Vec<u8>)>,
}

const NAME: &str = "backup/20261130T043012Z-3f9a/data/base.tar";

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let tar = match walcore_benches::load_or_generate_base_tar() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("walcore-benches: cannot make a base backup: {e}");
                std::process::exit(2);
            }
        };
        let key = Arc::new(MasterKey::from_hex(&"cd".repeat(32)).expect("a valid key"));
        let codec = |level: i32, threads: usize| {
            Codec::new(Compression::Zstd { level }, Some(Arc::clone(&key))).with_threads(threads)
        };
        let variants = [
            ("zstd3+aes/2 threads (default)", codec(3, 2)),
            ("zstd1+aes/2 threads", codec(1, 2)),
            ("zstd3+aes/1 thread", codec(3, 1)),
        ]
        .into_iter()
        .map(|(name, c)| {
            let mut stored = Vec::new();
            c.encode(NAME, &tar[..], &mut stored).expect("encode");
            eprintln!(
                "walcore-benches: base.tar {} bytes, {name}: stored {} bytes ({:.3})",
                tar.len(),
                stored.len(),
                stored.len() as f64 / tar.len() as f64
            );
            (name, c, stored)
        })
        .collect();
        Setup { tar, variants }
    })
}

/// Counts what a restore would write.
#[derive(Default)]
struct Count {
    entries: u64,
    bytes: u64,
}

impl TarSink for Count {
    type Error = TarError;
    fn entry(&mut self, _: &Entry) -> Result<(), TarError> {
        self.entries += 1;
        Ok(())
    }
    fn data(&mut self, bytes: &[u8]) -> Result<(), TarError> {
        self.bytes += bytes.len() as u64;
        Ok(())
    }
    fn end_entry(&mut self) -> Result<(), TarError> {
        Ok(())
    }
}

/// A `Write` that parses what it is given as tar.
struct Parse {
    reader: TarReader,
    count: Count,
}

impl std::io::Write for Parse {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.reader
            .feed(buf, &mut self.count)
            .map_err(std::io::Error::other)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn backup(c: &mut Criterion) {
    let s = setup();
    let mut g = c.benchmark_group("base backup");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(s.tar.len() as u64));
    for (name, codec, stored) in &s.variants {
        g.bench_function(format!("take: encode/{name}"), |b| {
            b.iter(|| {
                codec
                    .encode(NAME, black_box(&s.tar[..]), std::io::sink())
                    .expect("encode")
            })
        });
        g.bench_function(format!("restore: decode + tar/{name}"), |b| {
            b.iter(|| {
                let mut out = Parse {
                    reader: TarReader::new(),
                    count: Count::default(),
                };
                codec
                    .decode(NAME, black_box(&stored[..]), &mut out)
                    .expect("decode");
                out.reader.finish().expect("complete archive");
                out.count.bytes
            })
        });
    }
    g.bench_function("tar reader alone", |b| {
        b.iter(|| {
            let mut r = TarReader::new();
            let mut count = Count::default();
            r.feed(black_box(&s.tar), &mut count).expect("parse");
            r.finish().expect("complete");
            count.entries
        })
    });
    g.finish();
}

criterion_group!(benches, backup);
criterion_main!(benches);
