//! The copy-on-write layer against real sparse files in a temp dir, and against an in-memory
//! model of the volume's bytes.

use std::sync::Arc;

use super::*;
use crate::kit::noise;

const C: u64 = 64 * 1024;

struct Fixture {
    dir: tempfile::TempDir,
    spec: CowSpec,
    /// The base's bytes (empty without a base).
    base: Vec<u8>,
}

/// A replica of `size` bytes with clusters of `cluster`, over a base of `base_len` bytes of a
/// pattern (None: no base).
fn fixture(size: u64, cluster: u32, base_len: Option<usize>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let base = base_len.map(|n| noise(n, 99)).unwrap_or_default();
    let base_path = base_len.map(|_| {
        let p = dir.path().join("base.raw");
        std::fs::write(&p, &base).unwrap();
        p
    });
    let spec = CowSpec {
        data: dir.path().join("volume.data"),
        map: dir.path().join("volume.map"),
        base: base_path,
    };
    create(&spec, size, cluster).unwrap();
    Fixture { dir, spec, base }
}

impl Fixture {
    fn open(&self) -> Cow {
        Cow::open(&self.spec, false).unwrap()
    }

    /// The volume's bytes before any write.
    fn initial(&self, size: u64) -> Vec<u8> {
        let mut v = vec![0u8; size as usize];
        let n = self.base.len().min(size as usize);
        v[..n].copy_from_slice(&self.base[..n]);
        v
    }

    /// Copies of the data and map files as they are now (what a killed process leaves), as a
    /// spec that opens them over the same base.
    fn snapshot(&self, name: &str) -> CowSpec {
        let data = self.dir.path().join(format!("{name}.data"));
        let map = self.dir.path().join(format!("{name}.map"));
        std::fs::copy(&self.spec.data, &data).unwrap();
        std::fs::copy(&self.spec.map, &map).unwrap();
        CowSpec {
            data,
            map,
            base: self.spec.base.clone(),
        }
    }
}

fn read_all(cow: &Cow) -> Vec<u8> {
    let mut buf = vec![0u8; cow.size() as usize];
    cow.read_at(&mut buf, 0).unwrap();
    buf
}

fn allocated(path: &Path) -> u64 {
    crate::sync::allocated_bytes(path).unwrap()
}

#[test]
fn a_new_replica_reads_its_base_then_zeros_past_the_base() {
    // The base ends inside a cluster; the volume is larger than the base.
    let f = fixture(8 * C, 65536, Some(3 * C as usize + 1000));
    let cow = f.open();
    assert_eq!(read_all(&cow), f.initial(8 * C));
    let mut buf = vec![1u8; 5000];
    cow.read_at(&mut buf, 3 * C - 2000).unwrap();
    assert_eq!(buf, f.initial(8 * C)[(3 * C - 2000) as usize..][..5000]);
    assert_eq!(cow.clusters_in_data(), 0);
    assert_eq!(
        allocated(&f.spec.data),
        0,
        "a new replica takes no data blocks"
    );
}

#[test]
fn a_replica_without_a_base_reads_zeros() {
    let f = fixture(4 * C, 65536, None);
    assert_eq!(read_all(&f.open()), vec![0u8; 4 * C as usize]);
}

#[test]
fn a_partial_write_to_a_clear_cluster_copies_the_rest_of_the_cluster_from_the_base() {
    let f = fixture(4 * C, 65536, Some(4 * C as usize));
    let cow = f.open();
    let mut model = f.initial(4 * C);
    let bytes = noise(4096, 1);
    cow.write_at(&bytes, C + 8192).unwrap();
    model[(C + 8192) as usize..][..4096].copy_from_slice(&bytes);
    assert_eq!(read_all(&cow), model);
    assert_eq!(cow.clusters_in_data(), 1);
    // The whole cluster is in `data`: the base's bytes of it were copied there.
    let data = std::fs::read(&f.spec.data).unwrap();
    assert_eq!(
        &data[C as usize..2 * C as usize],
        &model[C as usize..2 * C as usize]
    );
    // A second write to the set cluster goes straight to data.
    let more = noise(100, 2);
    cow.write_at(&more, C + 10).unwrap();
    model[(C + 10) as usize..][..100].copy_from_slice(&more);
    assert_eq!(read_all(&cow), model);
}

#[test]
fn a_whole_cluster_write_does_not_read_the_base_and_writes_across_cluster_edges_merge() {
    let f = fixture(6 * C, 65536, Some(6 * C as usize));
    let cow = f.open();
    let mut model = f.initial(6 * C);
    let whole = noise(C as usize, 3);
    cow.write_at(&whole, 2 * C).unwrap();
    model[2 * C as usize..3 * C as usize].copy_from_slice(&whole);
    // From the middle of cluster 0 over clear 1, set 2, to the middle of clear 3.
    let across = noise((3 * C) as usize, 4);
    cow.write_at(&across, C / 2).unwrap();
    model[(C / 2) as usize..][..across.len()].copy_from_slice(&across);
    assert_eq!(read_all(&cow), model);
    assert_eq!(cow.clusters_in_data(), 4);
    // The last cluster of a volume whose size is not a multiple of the cluster.
    let g = fixture(2 * C + 4096, 65536, Some(2 * C as usize + 4096));
    let cow = g.open();
    let mut model = g.initial(2 * C + 4096);
    cow.write_at(&[7u8; 512], 2 * C + 512).unwrap();
    model[(2 * C + 512) as usize..][..512].fill(7);
    assert_eq!(read_all(&cow), model);
    assert!(cow.write_at(&[1u8; 512], 2 * C + 4096 - 256).is_err());
}

#[test]
fn discard_and_zeroing_over_a_base_keep_zeros_in_data_so_the_base_never_shows_through() {
    let f = fixture(4 * C, 65536, Some(4 * C as usize));
    let cow = f.open();
    let mut model = f.initial(4 * C);
    // Whole clusters 0 (discard) and 1 (zeroing), and part of cluster 2 (clear) and 3 (set).
    cow.write_at(&noise(C as usize, 5), 3 * C).unwrap();
    model[3 * C as usize..].copy_from_slice(&noise(C as usize, 5));
    cow.discard(0, C).unwrap();
    cow.write_zeroes(C, C).unwrap();
    cow.discard(2 * C + 100, 1000).unwrap();
    cow.write_zeroes(3 * C + 4096, 8192).unwrap();
    model[..2 * C as usize].fill(0);
    model[(2 * C + 100) as usize..][..1000].fill(0);
    model[(3 * C + 4096) as usize..][..8192].fill(0);
    assert_eq!(read_all(&cow), model);
    assert_eq!(cow.clusters_in_data(), 4);
    // And after a flush and a reopen.
    cow.sync().unwrap();
    drop(cow);
    assert_eq!(read_all(&f.open()), model);
}

#[test]
fn discard_without_a_base_punches_the_cluster_and_clears_its_bit() {
    let f = fixture(4 * C, 65536, None);
    let cow = f.open();
    cow.write_at(&noise((4 * C) as usize, 6), 0).unwrap();
    cow.sync().unwrap();
    let full = allocated(&f.spec.data);
    assert!(full >= 4 * C, "{full}");
    cow.discard(C, 2 * C).unwrap();
    cow.discard(3 * C + 4096, 4096).unwrap();
    let mut model = noise((4 * C) as usize, 6);
    model[C as usize..3 * C as usize].fill(0);
    model[(3 * C + 4096) as usize..][..4096].fill(0);
    assert_eq!(read_all(&cow), model);
    assert_eq!(cow.clusters_in_data(), 2);
    assert!(
        allocated(&f.spec.data) <= full - 2 * C,
        "the clusters are freed"
    );
    cow.sync().unwrap();
    drop(cow);
    let cow = f.open();
    assert_eq!(cow.clusters_in_data(), 2);
    assert_eq!(read_all(&cow), model);
    // A discard past the base's end with a base behaves the same.
    let g = fixture(4 * C, 65536, Some(C as usize));
    let cow = g.open();
    cow.write_at(&noise((4 * C) as usize, 7), 0).unwrap();
    cow.discard(2 * C, 2 * C).unwrap();
    assert_eq!(cow.clusters_in_data(), 2);
    assert_eq!(&read_all(&cow)[2 * C as usize..], vec![0u8; 2 * C as usize]);
}

#[test]
fn concurrent_writers_to_one_clear_cluster_each_keep_their_bytes() {
    for round in 0..20u64 {
        let f = fixture(4 * C, 65536, Some(4 * C as usize));
        let cow = Arc::new(f.open());
        let k = round % 4;
        // 16 threads, each writing its own 4 KiB of cluster k, all starting at once.
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let handles: Vec<_> = (0..16u64)
            .map(|t| {
                let (cow, barrier) = (cow.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    cow.write_at(&noise(4096, 100 + t), k * C + t * 4096)
                        .unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let mut model = f.initial(4 * C);
        for t in 0..16u64 {
            model[(k * C + t * 4096) as usize..][..4096].copy_from_slice(&noise(4096, 100 + t));
        }
        assert_eq!(read_all(&cow), model, "round {round}");
    }
}

#[test]
fn the_map_on_disk_takes_a_cluster_only_at_a_flush_and_flushed_writes_survive_a_kill() {
    let f = fixture(8 * C, 65536, Some(8 * C as usize));
    let cow = f.open();
    let mut model = f.initial(8 * C);
    let old = model.clone();
    cow.write_at(&noise(3000, 8), 10).unwrap();
    model[10..3010].copy_from_slice(&noise(3000, 8));
    // Killed before any flush: the map has no cluster, the volume reads as before the write
    // (the write was not flushed, so the guest may not rely on it).
    let before = Cow::open(&f.snapshot("before-flush"), false).unwrap();
    assert_eq!(before.clusters_in_data(), 0);
    assert_eq!(read_all(&before), old);
    cow.sync().unwrap();
    let flushed = model.clone();
    // Writes after the flush: to a set cluster, to clear ones, and a discard; then killed.
    cow.write_at(&noise(500, 9), 20).unwrap();
    cow.write_at(&noise((2 * C) as usize, 10), 3 * C + 7)
        .unwrap();
    cow.discard(6 * C, C).unwrap();
    model[20..520].copy_from_slice(&noise(500, 9));
    model[(3 * C + 7) as usize..][..(2 * C) as usize].copy_from_slice(&noise((2 * C) as usize, 10));
    model[6 * C as usize..7 * C as usize].fill(0);
    let killed = Cow::open(&f.snapshot("killed"), false).unwrap();
    let got = read_all(&killed);
    // Each cluster reads either as flushed or as written since: never anything else.
    for k in 0..8usize {
        let r = k * C as usize..(k + 1) * C as usize;
        assert!(
            got[r.clone()] == flushed[r.clone()] || got[r.clone()] == model[r.clone()],
            "cluster {k} reads neither its flushed nor its newer bytes"
        );
    }
    // The flushed write reads back wherever no later write covered it.
    assert_eq!(&got[520..3010], &flushed[520..3010]);
    cow.sync().unwrap();
    drop(cow);
    assert_eq!(read_all(&f.open()), model);
}

#[test]
fn random_operations_match_an_in_memory_model_across_flushes_and_reopens() {
    for (seed, cluster, base) in [
        (1u64, 65536u32, Some(300_000usize)),
        (2, 65536, None),
        (3, 4096, Some(1_000_000)),
        (4, 4096, None),
    ] {
        let size = 1_000_000u64; // not a multiple of either cluster
        let f = fixture(size, cluster, base);
        let mut cow = f.open();
        let mut model = f.initial(size);
        let mut flushed = model.clone();
        let mut rng = noise(4096 * 8, seed).into_iter().cycle();
        let mut next = move |n: u64| {
            let mut x = 0u64;
            for _ in 0..4 {
                x = x << 8 | rng.next().unwrap() as u64;
            }
            x % n
        };
        for step in 0..400 {
            let offset = next(size);
            let len = (1 + next(3 * cluster as u64)).min(size - offset);
            match next(10) {
                0..=4 => {
                    let bytes = noise(len as usize, seed * 1000 + step);
                    cow.write_at(&bytes, offset).unwrap();
                    model[offset as usize..][..len as usize].copy_from_slice(&bytes);
                }
                5 => {
                    cow.discard(offset, len).unwrap();
                    model[offset as usize..][..len as usize].fill(0);
                }
                6 => {
                    cow.write_zeroes(offset, len).unwrap();
                    model[offset as usize..][..len as usize].fill(0);
                }
                7 => {
                    cow.sync().unwrap();
                    flushed = model.clone();
                }
                8 => {
                    // A kill: each cluster reads as flushed or as now, then carry on with
                    // what the killed copy reads as the new truth.
                    let spec = f.snapshot(&format!("kill-{seed}-{step}"));
                    let killed = Cow::open(&spec, false).unwrap();
                    let got = read_all(&killed);
                    for k in 0..size.div_ceil(cluster as u64) as usize {
                        let r =
                            k * cluster as usize..((k + 1) * cluster as usize).min(size as usize);
                        assert!(
                            got[r.clone()] == flushed[r.clone()]
                                || got[r.clone()] == model[r.clone()],
                            "seed {seed} step {step}: cluster {k} reads garbage after a kill"
                        );
                    }
                    std::fs::remove_file(&spec.data).unwrap();
                    std::fs::remove_file(&spec.map).unwrap();
                }
                _ => {
                    cow.sync().unwrap();
                    drop(cow);
                    cow = f.open();
                    flushed = model.clone();
                }
            }
            let at = next(size);
            let n = (1 + next(200_000)).min(size - at) as usize;
            let mut buf = vec![0u8; n];
            cow.read_at(&mut buf, at).unwrap();
            assert_eq!(buf, model[at as usize..][..n], "seed {seed} step {step}");
        }
        assert_eq!(read_all(&cow), model, "seed {seed}");
    }
}

#[test]
fn opening_with_the_wrong_files_is_refused_with_the_fix() {
    let f = fixture(4 * C, 65536, Some(C as usize));
    let mut no_base = f.spec.clone();
    no_base.base = None;
    let e = Cow::open(&no_base, false).err().unwrap().to_string();
    assert!(e.contains("was made over a base; give it"), "{e}");
    std::fs::write(f.dir.path().join("other.raw"), [1u8; 10]).unwrap();
    let mut other = f.spec.clone();
    other.base = Some(f.dir.path().join("other.raw"));
    let e = Cow::open(&other, false).err().unwrap().to_string();
    assert!(e.contains("base of 65536 bytes but"), "{e}");
    let g = fixture(4 * C, 65536, None);
    let mut with_base = g.spec.clone();
    with_base.base = f.spec.base.clone();
    let e = Cow::open(&with_base, false).err().unwrap().to_string();
    assert!(e.contains("was made without a base"), "{e}");
    File::options()
        .write(true)
        .open(&g.spec.data)
        .unwrap()
        .set_len(C)
        .unwrap();
    let e = Cow::open(&g.spec, false).err().unwrap().to_string();
    assert!(e.contains("has 65536 bytes but its map"), "{e}");
    let mut not_map = g.spec.clone();
    not_map.map = f.spec.base.clone().unwrap();
    let e = Cow::open(&not_map, false).err().unwrap().to_string();
    assert!(e.contains("is not a bicsi copy-on-write map"), "{e}");
    let e = create(&f.spec, C, 65536).err().unwrap().to_string();
    assert!(e.contains("exists"), "{e}");
    let h = tempfile::tempdir().unwrap();
    let bad = CowSpec {
        data: h.path().join("d"),
        map: h.path().join("m"),
        base: None,
    };
    let e = create(&bad, C, 3000).err().unwrap().to_string();
    assert!(e.contains("not a power of two"), "{e}");
    assert!(!bad.data.exists() && !bad.map.exists(), "nothing half made");
}

#[test]
fn a_read_only_replica_refuses_writes() {
    let f = fixture(2 * C, 65536, None);
    let cow = Cow::open(&f.spec, true).unwrap();
    assert!(cow.write_at(&[1], 0).is_err());
    assert!(cow.discard(0, C).is_err());
    assert_eq!(read_all(&cow), vec![0u8; 2 * C as usize]);
}

#[test]
fn data_extents_are_the_written_clusters_and_the_base_under_the_clear_ones() {
    let f = fixture(8 * C, 65536, Some(C as usize));
    let cow = f.open();
    cow.write_at(&[1u8; 4096], 4 * C).unwrap();
    let e = cow.data_extents(0, 8 * C).unwrap();
    assert_eq!(
        e,
        vec![
            Extent { offset: 0, len: C },
            Extent {
                offset: 4 * C,
                len: C
            }
        ]
    );
    assert_eq!(cow.data_extents(2 * C, 3 * C).unwrap(), vec![]);
}

#[test]
fn spec_values_parse_or_say_what_to_write() {
    let ok = CowSpec::parse("data=/a/d,map=/a/m,base=/b/backing.raw").unwrap();
    assert_eq!(
        ok,
        CowSpec {
            data: "/a/d".into(),
            map: "/a/m".into(),
            base: Some("/b/backing.raw".into())
        }
    );
    assert_eq!(CowSpec::parse("map=/m,data=/d").unwrap().base, None);
    for (bad, says) in [
        ("/a/d", "is not KEY=PATH"),
        ("data=/d", "no map=PATH"),
        ("map=/m", "no data=PATH"),
        ("data=/d,map=/m,data=/e", "data given twice"),
        ("data=/d,map=/m,size=3", "unknown key"),
        ("data=,map=/m", "empty path"),
    ] {
        let e = CowSpec::parse(bad).unwrap_err();
        assert!(
            e.contains(says) && e.contains("data=PATH,map=PATH"),
            "{bad}: {e}"
        );
    }
}
