use std::os::unix::fs::MetadataExt;

use super::*;
use crate::backup::tar::{BLOCK, header_block};

/// A tar stream of `entries` (path, kind, content, link target), with the zero trailer.
fn archive(entries: &[(&str, EntryKind, &[u8], &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, kind, data, link) in entries {
        out.extend_from_slice(&header_block(path, *kind, 0o600, data.len() as u64, link));
        out.extend_from_slice(data);
        out.extend(std::iter::repeat_n(
            0u8,
            (BLOCK - data.len() % BLOCK) % BLOCK,
        ));
    }
    out.extend([0u8; 2 * BLOCK]);
    out
}

/// Extracts `tar` into `root` as `base.tar` (or a tablespace archive), tablespace 16390 mapped
/// to `ts`.
fn extract_into(
    root: &Path,
    is_base: bool,
    ts: &Path,
    owner: Option<Owner>,
    tar: &[u8],
) -> Result<FileSink, ExtractError> {
    let syncer = Syncer::start();
    let links = HashMap::from([(16390, ts.to_path_buf())]);
    let mut sink = FileSink::new(root.to_path_buf(), is_base, links, owner, &syncer);
    let mut reader = TarReader::new();
    // Small pieces: entries and their content arrive split, as from the decoder.
    for piece in tar.chunks(700) {
        reader.feed(piece, &mut sink)?;
    }
    reader.finish()?;
    sink.release();
    syncer.finish().map_err(ExtractError::Io)?;
    Ok(sink)
}

struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    ts: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("data");
    let outside = tmp.path().join("outside");
    let ts = tmp.path().join("ts");
    for d in [&root, &outside, &ts] {
        fs::create_dir(d).expect("mkdir");
    }
    Dirs {
        _tmp: tmp,
        root,
        outside,
        ts,
    }
}

fn refused(r: Result<FileSink, ExtractError>) -> String {
    match r {
        Err(e @ (ExtractError::Refused { .. } | ExtractError::Tar(_))) => e.to_string(),
        Err(e) => panic!("failed, but not refused: {e}"),
        Ok(_) => panic!("extracted what it must refuse"),
    }
}

fn empty(dir: &Path) -> bool {
    fs::read_dir(dir).expect("read dir").next().is_none()
}

#[test]
fn a_link_followed_by_a_file_below_it_is_refused() {
    let d = dirs();
    let outside = d.outside.to_string_lossy().into_owned();
    let tar = archive(&[
        ("PG_VERSION", EntryKind::File, b"15\n", ""),
        ("x", EntryKind::Symlink, b"", &outside),
        ("x/evil", EntryKind::File, b"owned", ""),
    ]);
    let e = refused(extract_into(&d.root, true, &d.ts, None, &tar));
    assert!(e.contains("\"x\"") && e.contains("symbolic link"), "{e}");
    assert!(empty(&d.outside), "something was written outside");
    assert!(
        fs::symlink_metadata(d.root.join("x")).is_err(),
        "the link was made"
    );
}

#[test]
fn links_in_tablespace_archives_and_unknown_tablespaces_are_refused() {
    let d = dirs();
    let outside = d.outside.to_string_lossy().into_owned();
    let tar = archive(&[("PG_15_202209061/x", EntryKind::Symlink, b"", &outside)]);
    let e = refused(extract_into(&d.ts, false, &d.ts, None, &tar));
    assert!(e.contains("tablespace archive"), "{e}");
    let tar = archive(&[("pg_tblspc/99999", EntryKind::Symlink, b"", &outside)]);
    let e = refused(extract_into(&d.root, true, &d.ts, None, &tar));
    assert!(e.contains("99999") && e.contains("does not list"), "{e}");
    assert!(empty(&d.outside));
}

#[test]
fn nothing_is_written_through_a_link_already_there() {
    // Whoever made it: a directory on an entry's path that is a link stops the restore.
    let d = dirs();
    std::os::unix::fs::symlink(&d.outside, d.root.join("base")).expect("symlink");
    let tar = archive(&[("base/1/1259", EntryKind::File, b"data", "")]);
    let e = refused(extract_into(&d.root, true, &d.ts, None, &tar));
    assert!(e.contains("base is a link"), "{e}");
    // Nor is a file created over a link, or a directory entry accepted on one.
    let d = dirs();
    std::os::unix::fs::symlink(d.outside.join("f"), d.root.join("f")).expect("symlink");
    let tar = archive(&[("f", EntryKind::File, b"data", "")]);
    assert!(matches!(
        extract_into(&d.root, true, &d.ts, None, &tar),
        Err(ExtractError::Io(_))
    ));
    std::os::unix::fs::symlink(&d.outside, d.root.join("dir")).expect("symlink");
    let tar = archive(&[("dir", EntryKind::Directory, b"", "")]);
    let e = refused(extract_into(&d.root, true, &d.ts, None, &tar));
    assert!(e.contains("non-directory"), "{e}");
    assert!(empty(&d.outside));
    // Nothing goes below the tablespace links the restore itself makes.
    let d = dirs();
    let tar = archive(&[
        ("pg_tblspc/16390", EntryKind::Symlink, b"", "/old/place"),
        ("pg_tblspc/16390/evil", EntryKind::File, b"x", ""),
    ]);
    let e = refused(extract_into(&d.root, true, &d.ts, None, &tar));
    assert!(e.contains("pg_tblspc/16390 is a link"), "{e}");
    assert!(empty(&d.ts));
}

#[test]
fn hard_links_are_refused() {
    let d = dirs();
    let mut tar = archive(&[("evil", EntryKind::File, b"", "")]);
    let outside = d.outside.join("f").to_string_lossy().into_owned();
    let mut h = header_block("evil", EntryKind::File, 0o600, 0, &outside);
    h[156] = b'1';
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&x| u32::from(x)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar[..BLOCK].copy_from_slice(&h);
    let e = refused(extract_into(&d.root, true, &d.ts, None, &tar));
    assert!(e.contains("hard link") && e.contains(&outside), "{e}");
    assert!(empty(&d.root) && empty(&d.outside));
}

#[test]
fn what_postgresql_writes_is_extracted() {
    let d = dirs();
    let control = vec![3u8; 8192];
    let tar = archive(&[
        ("PG_VERSION", EntryKind::File, b"15\n", ""),
        ("base", EntryKind::Directory, b"", ""),
        ("base/1/1259", EntryKind::File, &[1u8; 2000], ""),
        ("global/pg_control", EntryKind::File, &control, ""),
        ("pg_wal", EntryKind::Symlink, b"", "/elsewhere/wal"),
        ("pg_wal/archive_status", EntryKind::Directory, b"", ""),
        ("pg_tblspc/16390", EntryKind::Symlink, b"", "/old/place"),
    ]);
    let sink = extract_into(&d.root, true, &d.ts, None, &tar).expect("extracted");
    assert_eq!(sink.pg_control.as_deref(), Some(&control[..]));
    assert!(
        !d.root.join("global/pg_control").exists(),
        "pg_control is written last"
    );
    assert_eq!(
        fs::read(d.root.join("base/1/1259")).expect("file"),
        vec![1u8; 2000]
    );
    let wal = fs::symlink_metadata(d.root.join("pg_wal")).expect("pg_wal");
    assert!(wal.is_dir(), "a pg_wal link becomes a directory");
    assert!(d.root.join("pg_wal/archive_status").is_dir());
    assert_eq!(
        fs::read_link(d.root.join("pg_tblspc/16390")).expect("link"),
        d.ts
    );
    assert_eq!(sink.files, 2);
}

#[test]
fn pg_control_sizes_are_not_trusted() {
    let d = dirs();
    let mut tar = archive(&[("global/pg_control", EntryKind::File, b"", "")]);
    // A header claiming 8 GiB, with no content: refused before any allocation.
    let mut h = header_block("global/pg_control", EntryKind::File, 0o600, 8 << 30, "");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&x| u32::from(x)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar[..BLOCK].copy_from_slice(&h);
    let e = refused(extract_into(&d.root, true, &d.ts, None, &tar));
    assert!(e.contains("pg_control holds at most"), "{e}");
}

#[test]
fn an_owner_gets_every_created_file_directory_and_link() {
    if !crate::owner::running_as_root() {
        eprintln!("not root: giving files away cannot be tested");
        return;
    }
    let d = dirs();
    let owner = Owner {
        uid: 4242,
        gid: 4343,
    };
    let tar = archive(&[
        ("PG_VERSION", EntryKind::File, b"15\n", ""),
        ("base/1/1259", EntryKind::File, b"x", ""),
        ("global", EntryKind::Directory, b"", ""),
        ("pg_tblspc/16390", EntryKind::Symlink, b"", "/old"),
    ]);
    extract_into(&d.root, true, &d.ts, Some(owner), &tar).expect("extracted");
    for p in [
        "PG_VERSION",
        "base",
        "base/1",
        "base/1/1259",
        "global",
        "pg_tblspc",
        "pg_tblspc/16390",
    ] {
        let m = fs::symlink_metadata(d.root.join(p)).expect(p);
        assert_eq!((m.uid(), m.gid()), (4242, 4343), "{p}");
    }
    let f = d.root.join("recovery.signal");
    write_new(&f, b"", Some(owner)).expect("write");
    assert_eq!(fs::metadata(&f).expect("stat").uid(), 4242);
    // write_new never writes through a link.
    std::os::unix::fs::symlink(d.outside.join("x"), d.root.join("l")).expect("symlink");
    assert!(write_new(&d.root.join("l"), b"x", None).is_err());
    assert!(empty(&d.outside));
}
