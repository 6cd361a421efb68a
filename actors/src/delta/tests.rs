use super::*;
use rand::{Rng, RngCore, SeedableRng};

/// The seed for a randomized test: `MESH_TEST_SEED` when set (to replay a failure), else
/// a fresh one. Printed either way so that a failing run can be replayed.
fn test_seed() -> u64 {
    let seed = match std::env::var("MESH_TEST_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("MESH_TEST_SEED={s:?} is not a u64")),
        Err(_) => rand::random(),
    };
    println!("seed {seed} (replay with MESH_TEST_SEED={seed})");
    seed
}

fn random_bytes(rng: &mut impl RngCore, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Something shaped like machine code: short "instructions" with 4-byte absolute
/// addresses, which is where bsdiff's diff bytes earn their keep.
fn code_like(rng: &mut impl RngCore, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        let op = (rng.next_u32() % 16) as u8;
        v.push(0x40 | op);
        if op < 10 {
            let addr = (0x1000 + rng.next_u32() % (n as u32 + 1)) & !3;
            v.extend_from_slice(&addr.to_le_bytes());
        } else {
            v.push((rng.next_u32() % 8) as u8);
        }
    }
    v.truncate(n);
    v
}

/// A new version of `old`: a block inserted in the middle (so every later address moves),
/// a few bytes patched and a tail changed.
fn next_version(rng: &mut impl RngCore, old: &[u8]) -> Vec<u8> {
    let n = old.len();
    let cut = if n == 0 {
        0
    } else {
        rng.next_u32() as usize % n
    };
    let inserted_len = 1 + rng.next_u32() as usize % (n / 8 + 16);
    let inserted = code_like(rng, inserted_len);
    let shift = inserted.len() as u32;
    let mut new = Vec::with_capacity(n + inserted.len());
    new.extend_from_slice(&old[..cut]);
    new.extend_from_slice(&inserted);
    new.extend_from_slice(&old[cut..]);
    // Move every address-looking word after the cut, as a relink would.
    let mut i = cut + inserted.len();
    while i + 5 <= new.len() {
        if new[i] & 0xf0 == 0x40 && new[i] & 0x0f < 10 {
            let mut w = [0u8; 4];
            w.copy_from_slice(&new[i + 1..i + 5]);
            let addr = u32::from_le_bytes(w).wrapping_add(shift);
            new[i + 1..i + 5].copy_from_slice(&addr.to_le_bytes());
            i += 5;
        } else {
            i += 1;
        }
    }
    for _ in 0..(rng.next_u32() % 8) {
        if !new.is_empty() {
            let at = rng.next_u32() as usize % new.len();
            new[at] ^= 1 + (rng.next_u32() % 255) as u8;
        }
    }
    new
}

fn round_trip(codec: Codec, old: &[u8], new: &[u8]) -> Vec<u8> {
    let patch = create(codec, old, new).unwrap_or_else(|e| panic!("{codec}: {e}"));
    let header = read_header(&patch).unwrap();
    assert_eq!(header.codec, codec);
    assert_eq!(header.base, ContentId::of(old));
    assert_eq!(header.target, ContentId::of(new));
    assert_eq!(header.target_bytes, new.len() as u64);
    let mut out = Vec::new();
    let stats = apply(old, &patch[..], &mut out, ContentId::of(new))
        .unwrap_or_else(|e| panic!("{codec}: {e}"));
    assert!(out == new, "{codec}: result differs");
    assert_eq!(stats.patch_bytes, patch.len() as u64);
    assert_eq!(stats.target_bytes, new.len() as u64);
    patch
}

fn apply_to_vec(old: &[u8], patch: &[u8], expected: ContentId) -> Result<Vec<u8>, ApplyError> {
    let mut out = Vec::new();
    apply(old, patch, &mut out, expected)?;
    Ok(out)
}

#[test]
fn round_trips_edge_cases() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let small = code_like(&mut rng, 3000);
    let other = random_bytes(&mut rng, 2000);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("both empty", vec![], vec![]),
        ("empty old", vec![], small.clone()),
        ("empty new", small.clone(), vec![]),
        ("identical", small.clone(), small.clone()),
        ("one byte", vec![1], vec![2]),
        (
            "totally different",
            other.clone(),
            random_bytes(&mut rng, 2500),
        ),
        ("shrink", small.clone(), small[100..900].to_vec()),
    ];
    for (name, old, new) in &cases {
        for codec in Codec::ALL {
            println!("{name} / {codec}");
            round_trip(codec, old, new);
        }
        let (codec, best) = create_best(old, new).unwrap();
        for other in Codec::ALL {
            assert!(
                best.len() <= create(other, old, new).unwrap().len(),
                "{name}: best is {codec}"
            );
        }
    }
}

#[test]
fn round_trips_code_like_images_and_compress_them() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for n in [10_000usize, 200_000] {
        let old = code_like(&mut rng, n);
        let new = next_version(&mut rng, &old);
        for codec in Codec::ALL {
            let patch = round_trip(codec, &old, &new);
            println!("{n} bytes / {codec}: patch {} bytes", patch.len());
            // A relinked image with a small insertion must cost far less than itself.
            assert!(
                patch.len() * 2 < new.len(),
                "{codec}: {} of {}",
                patch.len(),
                new.len()
            );
        }
    }
}

#[test]
fn apply_file_matches_apply() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let old = code_like(&mut rng, 50_000);
    let new = next_version(&mut rng, &old);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.img");
    std::fs::write(&path, &old).unwrap();
    for codec in Codec::ALL {
        let patch = create(codec, &old, &new).unwrap();
        let mut out = Vec::new();
        apply_file(&path, &patch[..], &mut out, ContentId::of(&new)).unwrap();
        assert!(out == new, "{codec}");
        let wrong = dir.path().join("wrong.img");
        std::fs::write(&wrong, &new).unwrap();
        let err = apply_file(&wrong, &patch[..], Vec::new(), ContentId::of(&new)).unwrap_err();
        assert!(
            matches!(err, ApplyError::WrongBase { .. }),
            "{codec}: {err}"
        );
    }
}

#[test]
fn wrong_base_and_wrong_expected_hash_are_refused() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let old = code_like(&mut rng, 20_000);
    let new = next_version(&mut rng, &old);
    let mut other = old.clone();
    other[10] ^= 1;
    for codec in Codec::ALL {
        let patch = create(codec, &old, &new).unwrap();
        let err = apply_to_vec(&other, &patch, ContentId::of(&new)).unwrap_err();
        assert!(
            matches!(err, ApplyError::WrongBase { .. }),
            "{codec}: {err}"
        );
        let err = apply_to_vec(&old[1..], &patch, ContentId::of(&new)).unwrap_err();
        assert!(
            matches!(err, ApplyError::WrongBase { .. }),
            "{codec}: {err}"
        );
        let err = apply_to_vec(&old, &patch, ContentId::of(&old)).unwrap_err();
        assert!(
            matches!(err, ApplyError::WrongTarget { .. }),
            "{codec}: {err}"
        );
        assert!(err.to_string().starts_with("applying patch: "));
    }
}

#[test]
fn corrupted_patches_error_and_never_yield_a_wrong_result() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    let old = code_like(&mut rng, 30_000);
    let new = next_version(&mut rng, &old);
    let expected = ContentId::of(&new);
    for codec in Codec::ALL {
        let patch = create(codec, &old, &new).unwrap();
        // Every single-bit flip in the header is refused.
        for i in 0..HEADER_BYTES {
            for bit in 0..8 {
                let mut bad = patch.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    apply_to_vec(&old, &bad, expected).is_err(),
                    "{codec}: flip of bit {bit} of header byte {i} accepted"
                );
            }
        }
        // Body flips either fail or (when zstd ignores the bit) still give exactly the
        // target: the hash check makes anything else impossible. Nearly all must fail.
        let body = patch.len() - HEADER_BYTES;
        let (mut tried, mut refused) = (0, 0);
        for i in (HEADER_BYTES..patch.len()).step_by((body / 300).max(1)) {
            let mut bad = patch.clone();
            bad[i] ^= 1 << (i % 8);
            tried += 1;
            match apply_to_vec(&old, &bad, expected) {
                Err(_) => refused += 1,
                Ok(out) => assert!(out == new, "{codec}: wrong result accepted"),
            }
        }
        println!("{codec}: {refused} of {tried} body flips refused");
        assert!(
            refused * 10 >= tried * 9,
            "{codec}: only {refused} of {tried} refused"
        );
    }
}

#[test]
fn truncated_and_extended_patches_are_refused() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let old = code_like(&mut rng, 5_000);
    let new = next_version(&mut rng, &old);
    let expected = ContentId::of(&new);
    for codec in Codec::ALL {
        let patch = create(codec, &old, &new).unwrap();
        for len in 0..patch.len() {
            let err = apply_to_vec(&old, &patch[..len], expected);
            assert!(err.is_err(), "{codec}: prefix of {len} bytes accepted");
        }
        for extra in [&[0u8][..], b"junk", &[0x28, 0xb5, 0x2f, 0xfd]] {
            let mut long = patch.clone();
            long.extend_from_slice(extra);
            let err = apply_to_vec(&old, &long, expected).unwrap_err();
            assert!(matches!(err, ApplyError::Corrupt(_)), "{codec}: {err}");
        }
    }
    assert!(matches!(
        read_header(b"MDLT"),
        Err(HeaderError::Truncated(4))
    ));
}

/// A bsdiff-class patch for `old` and `target` whose body is `plain` (the layout
/// `sections::fuzz_pack` takes: sections uncompressed, compressed there).
fn crafted_bsdiff(old: &[u8], target: &[u8], plain: &[u8]) -> Vec<u8> {
    let header = PatchHeader {
        codec: Codec::Bsdiff,
        base: ContentId::of(old),
        base_bytes: old.len() as u64,
        target: ContentId::of(target),
        target_bytes: target.len() as u64,
    };
    [&header.to_bytes()[..], &sections::fuzz_pack(plain)].concat()
}

fn leb(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One block in plain layout: controls, then diff and extra sections with the given
/// method bytes (zstd, plain transform unless said otherwise).
fn plain_block(
    controls: &[(u64, u64, i64)],
    methods: [u8; 3],
    diff: &[u8],
    extra: &[u8],
) -> Vec<u8> {
    let mut ctrl = Vec::new();
    for &(add, copy, seek) in controls {
        leb(&mut ctrl, add);
        leb(&mut ctrl, copy);
        leb(&mut ctrl, ((seek << 1) ^ (seek >> 63)) as u64);
    }
    let mut out = Vec::new();
    leb(&mut out, controls.len() as u64);
    for (method, bytes) in methods.into_iter().zip([&ctrl[..], diff, extra]) {
        out.push(method);
        leb(&mut out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    out
}

#[test]
fn hostile_bsdiff_bodies_are_refused() {
    let old: Vec<u8> = (0..100u8).collect();
    let target = [&old[..], &old[..]].concat();
    let expected = ContentId::of(&target);
    let z = |n: usize| vec![0u8; n];
    const ZSTD: [u8; 3] = [1, 1, 1];
    const BZIP2: [u8; 3] = [2, 2, 2];
    let end = [0u8];
    let mut ten_ff = vec![0xffu8; 10];
    ten_ff.push(0x01);
    // A correct body: the old image twice, the second time by seeking back.
    let good = [
        plain_block(&[(100, 0, -100), (100, 0, 0)], ZSTD, &z(200), &[]),
        end.to_vec(),
    ]
    .concat();
    let good_bz = [
        plain_block(&[(100, 0, -100), (100, 0, 0)], BZIP2, &z(200), &[]),
        end.to_vec(),
    ]
    .concat();
    let mut sparse_runs_past = Vec::new();
    leb(&mut sparse_runs_past, 200);
    sparse_runs_past.push(1);
    let mut huge_stored = vec![1u8, 1];
    leb(&mut huge_stored, 1 << 40);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "control reads outside the old image",
            plain_block(&[(101, 0, 0)], ZSTD, &z(101), &[]),
        ),
        // The second control starts at position -1.
        (
            "control reads outside the old image",
            plain_block(&[(1, 0, -2), (1, 0, 0)], ZSTD, &z(2), &[]),
        ),
        (
            "control produces nothing",
            plain_block(&[(1, 0, 0), (0, 0, 0)], ZSTD, &z(1), &[]),
        ),
        ("block has too many controls", vec![0x81, 0x80, 0x01]),
        ("number overflows 64 bits", ten_ff),
        ("number longer than ten bytes", vec![0x80; 11]),
        (
            "controls produce more than the target size",
            plain_block(&[(0, 201, 1)], ZSTD, &[], &z(201)),
        ),
        (
            "block has too many diff bytes",
            plain_block(&[((1 << 20) + 1, 0, 0)], ZSTD, &[], &[]),
        ),
        (
            "block has too many extra bytes",
            plain_block(&[(0, (1 << 20) + 1, 0)], ZSTD, &[], &[]),
        ),
        ("controls section has bytes left over", {
            let mut b = plain_block(&[(100, 0, 0)], ZSTD, &z(100), &[]);
            // Lengthen the controls section by one byte (count, method, length = 3).
            b[2] += 1;
            b.insert(3 + 3, 0);
            b
        }),
        (
            "section shorter than its controls need",
            plain_block(&[(10, 0, 0)], ZSTD, &z(5), &[]),
        ),
        (
            "unknown section method",
            plain_block(&[(10, 0, 0)], [1, 0x23, 1], &z(10), &[]),
        ),
        (
            "unknown section method",
            plain_block(&[(10, 0, 0)], [0x11, 1, 1], &z(10), &[]),
        ),
        (
            "sparse diff runs past its block",
            plain_block(&[(100, 0, 0)], [1, 0x11, 1], &sparse_runs_past, &[]),
        ),
        (
            "section longer than its block allows",
            plain_block(&[(100, 0, 0)], ZSTD, &z(101), &[]),
        ),
        (
            "section longer than its block allows",
            plain_block(&[(100, 0, 0)], BZIP2, &z(101), &[]),
        ),
        (
            "bytes after the end of the body",
            [&good[..], &[5]].concat(),
        ),
    ];
    for (want, plain) in cases {
        let patch = crafted_bsdiff(&old, &target, &plain);
        match apply_to_vec(&old, &patch, expected) {
            Err(ApplyError::Corrupt(why)) => assert_eq!(why, want),
            other => panic!("{want}: got {other:?}"),
        }
    }
    // Stored lengths are checked before anything is read for them (no fuzz_pack here,
    // which would recompress the section).
    let header = crafted_bsdiff(&old, &target, &[]);
    let patch = [&header[..], &huge_stored].concat();
    match apply_to_vec(&old, &patch, expected) {
        Err(ApplyError::Corrupt(why)) => {
            assert_eq!(why, "compressed section longer than its bound")
        }
        other => panic!("huge stored length: got {other:?}"),
    }
    for truncated in [&good[..good.len() - 1], &[]] {
        let patch = crafted_bsdiff(&old, &target, truncated);
        let err = apply_to_vec(&old, &patch, expected).unwrap_err();
        assert!(matches!(err, ApplyError::Truncated), "{err}");
    }
    // The guards above are not refusing everything: the correct bodies apply.
    for plain in [good, good_bz] {
        let patch = crafted_bsdiff(&old, &target, &plain);
        assert_eq!(apply_to_vec(&old, &patch, expected).unwrap(), target);
    }
}

#[test]
fn a_frame_asking_for_a_huge_window_is_refused_before_allocating() {
    use zstd::zstd_safe::{CCtx, CParameter, InBuffer, OutBuffer};
    let old = vec![7u8; 1000];
    let target = vec![9u8; 1000];
    let header = PatchHeader {
        codec: Codec::Zstd,
        base: ContentId::of(&old),
        base_bytes: old.len() as u64,
        target: ContentId::of(&target),
        target_bytes: target.len() as u64,
    };
    // A streamed frame with no content size declares its window (1 GiB here) instead.
    let mut cctx = CCtx::create();
    cctx.set_parameter(CParameter::WindowLog(30)).unwrap();
    cctx.set_parameter(CParameter::ContentSizeFlag(false))
        .unwrap();
    let mut frame = vec![0u8; 4096];
    let mut out = OutBuffer::around(&mut frame[..]);
    // Feeding the input before ending the frame keeps zstd from shrinking the window to
    // fit a size it would otherwise know.
    use zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::{ZSTD_e_continue, ZSTD_e_end};
    let mut input = InBuffer::around(&target);
    cctx.compress_stream2(&mut out, &mut input, ZSTD_e_continue)
        .unwrap();
    let mut rest = InBuffer::around(&[]);
    while cctx
        .compress_stream2(&mut out, &mut rest, ZSTD_e_end)
        .unwrap()
        != 0
    {}
    let n = out.pos();
    let mut patch = header.to_bytes().to_vec();
    patch.extend_from_slice(&frame[..n]);
    let err = apply_to_vec(&old, &patch, ContentId::of(&target)).unwrap_err();
    assert!(matches!(err, ApplyError::Decompress(_)), "{err}");
    println!("{err}");
}

#[test]
fn randomized_round_trips() {
    let seed = test_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..24 {
        let n = rng.gen_range(0..40_000);
        let old = if rng.gen_bool(0.5) {
            code_like(&mut rng, n)
        } else {
            random_bytes(&mut rng, n)
        };
        let new = match rng.gen_range(0..4) {
            0 => {
                let len = rng.gen_range(0..20_000);
                random_bytes(&mut rng, len)
            }
            1 => old.clone(),
            _ => next_version(&mut rng, &old),
        };
        let codec = Codec::ALL[rng.gen_range(0..Codec::ALL.len())];
        println!(
            "round {round}: {codec}, {} -> {} bytes",
            old.len(),
            new.len()
        );
        round_trip(codec, &old, &new);
    }
}

#[test]
fn codec_ids_and_names_round_trip() {
    for c in Codec::ALL {
        assert_eq!(Codec::from_id(c.id()), Some(c));
        assert_eq!(c.name().parse::<Codec>().unwrap(), c);
    }
    assert_eq!(Codec::from_id(0), None);
    assert!("xdelta".parse::<Codec>().is_err());
}

#[test]
fn window_logs_cover_the_images() {
    assert_eq!(zstd_window_log(0), ZSTD_WINDOW_LOG_MIN);
    assert_eq!(zstd_window_log(1 << 20), 20);
    assert_eq!(zstd_window_log((1 << 20) + 1), 21);
    assert_eq!(zstd_window_log(u64::MAX), ZSTD_WINDOW_LOG_MAX);
}

/// Valid inputs for [`fuzz_apply`] in each of its modes: patches from [`fuzz_old`] to a
/// few new versions, with both codecs, and their bodies alone.
fn fuzz_seeds() -> Vec<Vec<u8>> {
    let old = fuzz_old();
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut grown = old.clone();
    grown.extend_from_slice(&code_like(&mut rng, 500));
    let news = [
        next_version(&mut rng, &old),
        old[..1000].to_vec(),
        grown,
        random_bytes(&mut rng, 300),
    ];
    let mut seeds = Vec::new();
    for new in &news {
        let size = (new.len() as u16).to_le_bytes();
        for codec in Codec::ALL {
            let patch = create(codec, &old, new).unwrap();
            let mut out = Vec::new();
            apply(&old, &patch[..], &mut out, ContentId::of(new)).unwrap();
            seeds.push([&[0u8][..], &patch].concat());
            let body = &patch[HEADER_BYTES..];
            match codec {
                Codec::Bsdiff => {
                    let plain = sections::fuzz_unpack(body).unwrap();
                    seeds.push([&[1u8][..], &size, &plain].concat());
                }
                Codec::Zstd => seeds.push([&[3u8][..], &size, body].concat()),
            }
        }
    }
    seeds
}

/// Mutated inputs run through the fuzz target's body (the same code `cargo fuzz run
/// apply` runs), for when libFuzzer is not at hand. Set `MESH_FUZZ_CORPUS=DIR` to also
/// write the seeds there, as a starting corpus for cargo-fuzz.
#[test]
fn mutated_patches_never_panic() {
    /// Mutated inputs per run: a few seconds in a debug build.
    const ITERATIONS: usize = 20_000;
    let seeds = fuzz_seeds();
    if let Ok(dir) = std::env::var("MESH_FUZZ_CORPUS") {
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(std::path::Path::new(&dir).join(format!("seed-{i:02}")), s).unwrap();
        }
    }
    let seed = test_seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..ITERATIONS {
        let mut input = seeds[rng.gen_range(0..seeds.len())].clone();
        for _ in 0..rng.gen_range(1..4) {
            let len = input.len();
            // Byte 0 picks the mode: leave it so every mode gets its share.
            let at = rng.gen_range(1..len.max(2)).min(len);
            match rng.gen_range(0..6) {
                0 if at < len => input[at] ^= 1 << rng.gen_range(0..8),
                1 if at < len => input[at] = rng.gen(),
                2 => input.truncate(at),
                3 => {
                    let end = (at + rng.gen_range(0..64)).min(len);
                    input.drain(at..end);
                }
                4 => {
                    let n = rng.gen_range(1..32);
                    let junk = random_bytes(&mut rng, n);
                    input.splice(at..at, junk);
                }
                _ => {
                    let end = (at + rng.gen_range(0..64)).min(len);
                    let copy = input[at..end].to_vec();
                    input.splice(at..at, copy);
                }
            }
        }
        fuzz_apply(&input);
    }
}
