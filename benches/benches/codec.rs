//! Codec throughput on real PostgreSQL WAL: walcore's encode and decode against raw zstd,
//! AES-256-GCM and CRC-32 over the same 16 MiB segment. See `benches/README.md`.

use std::hint::black_box;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use criterion::measurement::WallTime;
use criterion::{
    BenchmarkGroup, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use walcore::codec::{Codec, Compression, MasterKey};
use walcore_benches::{SEGMENT_SIZE, Segment};

/// The walcore settings benchmarked, by name. The first is walcore's default.
fn variants() -> Vec<(&'static str, Codec)> {
    let key = Arc::new(MasterKey::from_hex(&"ab".repeat(32)).expect("a valid 32-byte hex key"));
    let codec = |level: Option<i32>, encrypted: bool, threads: usize| {
        let compression = level.map_or(Compression::None, |level| Compression::Zstd { level });
        Codec::new(compression, encrypted.then(|| Arc::clone(&key)))
            .with_chunk_size(1 << 20)
            .with_threads(threads)
    };
    vec![
        ("zstd3+aes/2 threads (default)", codec(Some(3), true, 2)),
        ("zstd3+aes/1 thread", codec(Some(3), true, 1)),
        ("zstd1+aes/2 threads", codec(Some(1), true, 2)),
        ("zstd1+aes/1 thread", codec(Some(1), true, 1)),
        ("none+aes/2 threads", codec(None, true, 2)),
        ("zstd3 no key/2 threads", codec(Some(3), false, 2)),
    ]
}

/// Everything the benches share, made once.
struct Setup {
    /// The segment every bench runs on: the one of median zstd -3 ratio.
    segment: Segment,
    /// Its object name (the associated data of walcore's chunks).
    object: String,
    /// Each variant with the segment encoded by it.
    variants: Vec<(&'static str, Codec, Vec<u8>)>,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let segments = match walcore_benches::load_or_generate() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("walcore-benches: cannot get real WAL: {e}");
                std::process::exit(2);
            }
        };
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        eprintln!(
            "walcore-benches: {} real WAL segments from {}; {} cores available; load average {} \
             (wall-clock results, the 2-thread ones most, need an otherwise idle machine)",
            segments.len(),
            walcore_benches::cache_dir().display(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
        for line in walcore_benches::cache_description(&walcore_benches::cache_dir()).lines() {
            eprintln!("  {line}");
        }
        let whole3 = report_ratios(&segments);

        let mut by_ratio: Vec<(f64, usize)> = whole3.iter().copied().zip(0..).collect();
        by_ratio.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (ratio, median) = by_ratio[by_ratio.len() / 2];
        let segment = segments[median].clone();
        eprintln!(
            "walcore-benches: benchmarking on segment {} (zstd -3 ratio {ratio:.2}x, the median)",
            segment.name
        );
        let object = format!("wal/{}/{}", &segment.name[..8], segment.name);

        let variants = variants()
            .into_iter()
            .map(|(name, codec)| {
                let stored = codec
                    .encode_to_vec(&object, &segment.data)
                    .expect("encoding a segment");
                let back = codec
                    .decode_to_vec(&object, &stored)
                    .expect("decoding what was just encoded");
                assert!(
                    back == segment.data,
                    "{name}: round trip changed the segment"
                );
                (name, codec, stored)
            })
            .collect();
        Setup {
            segment,
            object,
            variants,
        }
    })
}

/// The stored size of a segment under some setting.
type SizeOf = Box<dyn Fn(&Segment) -> usize>;

/// Prints the compression ratio of each chunk size and level over all segments (what the
/// defaults are chosen from); returns each segment's whole-file zstd -3 ratio.
fn report_ratios(segments: &[Segment]) -> Vec<f64> {
    let key = Arc::new(MasterKey::from_hex(&"ab".repeat(32)).expect("a valid 32-byte hex key"));
    let whole = |level: i32| -> SizeOf {
        Box::new(move |s: &Segment| {
            zstd::bulk::compress(&s.data, level)
                .expect("zstd compress")
                .len()
        })
    };
    let chunked = |level: i32, chunk: u32| -> SizeOf {
        let codec = Codec::new(Compression::Zstd { level }, Some(Arc::clone(&key)))
            .with_chunk_size(chunk)
            .with_threads(2);
        assert_eq!(codec.chunk_size(), chunk, "chunk size clamped");
        Box::new(move |s: &Segment| {
            let summary = codec
                .encode("wal/ratio", &s.data[..], std::io::sink())
                .expect("encoding a segment");
            usize::try_from(summary.stored_len).expect("stored length fits usize")
        })
    };
    let settings: Vec<(&str, SizeOf)> = vec![
        ("zstd -3 whole file, one frame", whole(3)),
        ("walcore zstd:3, 256 KiB chunks", chunked(3, 256 << 10)),
        (
            "walcore zstd:3, 1 MiB chunks (default)",
            chunked(3, 1 << 20),
        ),
        ("walcore zstd:3, 2 MiB chunks", chunked(3, 2 << 20)),
        ("walcore zstd:3, 4 MiB chunks", chunked(3, 4 << 20)),
        ("zstd -1 whole file, one frame", whole(1)),
        ("walcore zstd:1, 1 MiB chunks", chunked(1, 1 << 20)),
        ("walcore zstd:2, 1 MiB chunks", chunked(2, 1 << 20)),
        ("walcore zstd:5, 1 MiB chunks", chunked(5, 1 << 20)),
    ];
    eprintln!(
        "walcore-benches: compression ratio over {} segments (walcore sizes include its envelope: \
         header, chunk prefixes, GCM tags, trailer)",
        segments.len()
    );
    eprintln!(
        "  {:<42} {:>8} {:>8} {:>8} {:>10}",
        "setting", "overall", "min", "max", "time/seg"
    );
    let mut whole3 = Vec::new();
    for (i, (name, size_of)) in settings.iter().enumerate() {
        let t = Instant::now();
        let sizes: Vec<usize> = segments.iter().map(size_of).collect();
        let per_seg = t.elapsed() / u32::try_from(segments.len()).expect("few segments");
        let ratios: Vec<f64> = sizes
            .iter()
            .map(|&n| SEGMENT_SIZE as f64 / n as f64)
            .collect();
        let overall = (SEGMENT_SIZE * segments.len()) as f64 / sizes.iter().sum::<usize>() as f64;
        let min = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let max = ratios.iter().copied().fold(0.0, f64::max);
        eprintln!(
            "  {name:<42} {overall:>7.2}x {min:>7.2}x {max:>7.2}x {:>8.1}ms",
            per_seg.as_secs_f64() * 1e3
        );
        if i == 0 {
            whole3 = ratios;
        }
    }
    whole3
}

/// A group reading as MiB/s of plaintext, sized so the whole run takes a few minutes.
fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut g = c.benchmark_group(name);
    g.throughput(Throughput::Bytes(SEGMENT_SIZE as u64))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .sampling_mode(SamplingMode::Flat);
    g
}

fn encode(c: &mut Criterion) {
    let s = setup();
    let mut g = group(c, "encode");
    for (name, codec, stored) in &s.variants {
        let mut out = Vec::with_capacity(stored.len() + (1 << 20));
        g.bench_function(*name, |b| {
            b.iter(|| {
                out.clear();
                codec
                    .encode(&s.object, black_box(&s.segment.data[..]), &mut out)
                    .expect("encoding a segment");
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn decode(c: &mut Criterion) {
    let s = setup();
    let mut g = group(c, "decode");
    for (name, codec, stored) in &s.variants {
        let mut out = Vec::with_capacity(SEGMENT_SIZE);
        g.bench_function(*name, |b| {
            b.iter(|| {
                out.clear();
                codec
                    .decode(&s.object, black_box(&stored[..]), &mut out)
                    .expect("decoding a segment");
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// The raw building blocks on one thread, one 16 MiB message each: what walcore's chunking,
/// framing and threads add or gain is the difference.
fn baseline(c: &mut Criterion) {
    let s = setup();
    let plain = &s.segment.data;
    let mut g = group(c, "baseline");

    for level in [3, 1] {
        // A reused context, as walcore keeps one per thread; `zstd::bulk::compress` would add only
        // the context's allocation.
        let mut compressor = zstd::bulk::Compressor::new(level).expect("zstd context");
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(plain.len()));
        g.bench_function(format!("zstd{level} compress whole file"), |b| {
            b.iter(|| {
                out.clear();
                compressor
                    .compress_to_buffer(black_box(&plain[..]), &mut out)
                    .expect("zstd compress");
                black_box(out.len())
            })
        });
    }

    let frame = zstd::bulk::compress(plain, 3).expect("zstd compress");
    let mut decompressor = zstd::bulk::Decompressor::new().expect("zstd context");
    let mut out = Vec::with_capacity(SEGMENT_SIZE);
    g.bench_function("zstd3 decompress whole file", |b| {
        b.iter(|| {
            out.clear();
            decompressor
                .decompress_to_buffer(black_box(&frame[..]), &mut out)
                .expect("zstd decompress");
            black_box(out.len())
        })
    });

    let cipher = Aes256Gcm::new(&[0x5a; 32].into());
    let nonce = Nonce::from([7u8; 12]);
    let aad = s.object.as_bytes();
    // Encrypting in place over and over costs the same as encrypting the plaintext.
    let mut buf = plain.clone();
    g.bench_function("aes256gcm encrypt", |b| {
        b.iter(|| {
            let tag = cipher
                .encrypt_inout_detached(&nonce, aad, InOutBuf::from(&mut buf[..]))
                .expect("encrypt");
            black_box(tag)
        })
    });

    let mut ciphertext = plain.clone();
    let tag = cipher
        .encrypt_inout_detached(&nonce, aad, InOutBuf::from(&mut ciphertext[..]))
        .expect("encrypt");
    let mut decrypted = vec![0u8; ciphertext.len()];
    let io = InOutBuf::new(&ciphertext[..], &mut decrypted[..]).expect("equal lengths");
    cipher
        .decrypt_inout_detached(&nonce, aad, io, &tag)
        .expect("authentic");
    assert!(decrypted == *plain, "AES-GCM round trip");
    g.bench_function("aes256gcm decrypt", |b| {
        b.iter(|| {
            let io = InOutBuf::new(black_box(&ciphertext[..]), &mut decrypted[..])
                .expect("equal lengths");
            cipher
                .decrypt_inout_detached(&nonce, aad, io, &tag)
                .expect("authentic");
        })
    });

    g.bench_function("crc32fast", |b| {
        b.iter(|| crc32fast::hash(black_box(&plain[..])))
    });
    g.finish();
}

criterion_group!(benches, encode, decode, baseline);
criterion_main!(benches);
