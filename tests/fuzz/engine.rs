//! The fuzzing loop shared by the driver (`examples/fuzz.rs`) and the replay test
//! (`tests/integration/fuzz_corpus.rs`): picking inputs (generated, mutated corpus entries, or both),
//! running a target with panics caught, minimizing a crashing input, reading the corpus.
//!
//! Everything random comes from one [`StdRng`] seeded per target (`seed` mixed with the
//! target's name), so a run is reproduced by its seed and iteration count.

use std::cell::RefCell;
use std::collections::HashSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};

use super::gen::G;
use super::targets::Target;

/// The corpus folder of `target`: `tests/fuzz/corpus/<target>`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

/// The files of `target`'s corpus, sorted by name, with their bytes.
pub fn read_corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(corpus_dir(target)) else {
        return Vec::new();
    };
    let mut files: Vec<(String, Vec<u8>)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            std::fs::read(e.path()).ok().map(|bytes| (name, bytes))
        })
        .collect();
    files.sort();
    files
}

/// A panic caught while running a target: its message and where it was raised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    /// The panic message.
    pub message: String,
    /// `file:line:column` of the panic.
    pub location: String,
}

impl std::fmt::Display for Crash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "panicked at {}: {}", self.location, self.message)
    }
}

thread_local! {
    /// Set while [`run_catching`] runs a target: the panic hook records here instead of
    /// printing.
    static CAUGHT: RefCell<Option<Option<Crash>>> = const { RefCell::new(None) };
}

/// Installs (once) a panic hook that records panics raised inside [`run_catching`] and
/// leaves every other panic to the previous hook.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let recorded = CAUGHT.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        let message = info
                            .payload()
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_string())
                            .or_else(|| info.payload().downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(non-text panic payload)".into());
                        let location = info
                            .location()
                            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                            .unwrap_or_default();
                        *slot = Some(Crash { message, location });
                        true
                    }
                    None => false,
                }
            });
            if !recorded {
                previous(info);
            }
        }));
    });
}

/// Runs `target` on `input`: its outcome kind, or the panic it raised.
pub fn run_catching(target: &Target, input: &[u8]) -> Result<String, Crash> {
    install_hook();
    CAUGHT.with(|c| *c.borrow_mut() = Some(None));
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    let caught = CAUGHT.with(|c| c.borrow_mut().take()).flatten();
    result.map_err(|_| {
        caught.unwrap_or_else(|| Crash {
            message: "(panic not recorded)".into(),
            location: String::new(),
        })
    })
}

/// The smallest input found (within a budget of runs) that still panics at `crash`'s
/// location: chunks removed, halving their size, then bytes lowered towards zero.
pub fn minimize(target: &Target, input: &[u8], crash: &Crash) -> Vec<u8> {
    let same = |candidate: &[u8]| {
        run_catching(target, candidate).is_err_and(|c| c.location == crash.location)
    };
    let mut best = input.to_vec();
    let mut budget = 20_000usize;
    let mut chunk = best.len().div_ceil(2).max(1);
    loop {
        let mut progressed = false;
        let mut i = 0;
        while i < best.len() && budget > 0 {
            budget -= 1;
            let end = (i + chunk).min(best.len());
            let mut candidate = best[..i].to_vec();
            candidate.extend_from_slice(&best[end..]);
            if same(&candidate) {
                best = candidate;
                progressed = true;
            } else {
                i += chunk;
            }
        }
        if budget == 0 || (chunk == 1 && !progressed) {
            break;
        }
        if !progressed {
            chunk = chunk.div_ceil(2);
        }
    }
    for i in 0..best.len() {
        for lower in [0u8, b'0', b'a', 1] {
            if budget == 0 || best[i] <= lower {
                continue;
            }
            budget -= 1;
            let mut candidate = best.clone();
            candidate[i] = lower;
            if same(&candidate) {
                best = candidate;
                break;
            }
        }
    }
    best
}

/// The random source of `target` for `seed`.
pub fn rng_for(target: &Target, seed: u64) -> StdRng {
    let name = sagaflow_actors::hash::fnv1a(target.name.as_bytes());
    StdRng::seed_from_u64(seed ^ name)
}

/// `len` random bytes.
fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// A generated input: random choices, of a random size class, through the target's generator.
pub fn generate(rng: &mut StdRng, target: &Target) -> Vec<u8> {
    let len = match rng.random_range(0..10) {
        0..=2 => rng.random_range(0..64),
        3..=6 => rng.random_range(0..512),
        7 | 8 => rng.random_range(0..4_096),
        _ => rng.random_range(0..target.max_len.max(1)),
    };
    let choices = random_bytes(rng, len);
    let mut g = G::new(&choices);
    (target.generate)(&mut g)
}

/// Bytes worth writing over others: boundaries of integers and varints, separators.
const INTERESTING: &[&[u8]] = &[
    b"\x00",
    b"\x01",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\n",
    b".",
    b"\"",
    b"\\",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x80\x01",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\xc3\xa9",
    b"\xe2\x80\xae",
    b"\xf0\x9f\x92\xa5",
    b"\xed\xa0\x80",
];

/// Mutates `data` in place, 1 to 8 times (fewer more often): bit flips, byte changes,
/// deletions, insertions and duplications of ranges, dictionary tokens, splices with `other`.
pub fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, other: &[u8], target: &Target) {
    let rounds = 1 + (rng.random_range(0..64u32).trailing_zeros().min(7) as usize);
    for _ in 0..rounds {
        let len = data.len();
        let at = if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        };
        match rng.random_range(0..13) {
            0 if len > 0 => data[at] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => data[at] = rng.random(),
            2 if len > 0 => data[at] = data[at].wrapping_add(if rng.random() { 1 } else { 255 }),
            3 if len > 0 => {
                let n = rng.random_range(1..=(len - at).min(64));
                data.drain(at..at + n);
            }
            4 => {
                let n = rng.random_range(1..=16);
                let bytes = random_bytes(rng, n);
                data.splice(at..at, bytes);
            }
            5 if len > 0 => {
                let n = rng.random_range(1..=(len - at).min(256));
                let copy = data[at..at + n].to_vec();
                let to = rng.random_range(0..=len);
                data.splice(to..to, copy);
            }
            6 | 7 => {
                let tokens = if rng.random() || target.dictionary.is_empty() {
                    INTERESTING
                } else {
                    target.dictionary
                };
                let token = tokens[rng.random_range(0..tokens.len())];
                if rng.random() {
                    data.splice(at..at, token.iter().copied());
                } else {
                    let end = (at + token.len()).min(len);
                    data.splice(at..end, token.iter().copied());
                }
            }
            8 if !other.is_empty() => {
                let from = rng.random_range(0..other.len());
                let n = rng.random_range(1..=(other.len() - from).min(512));
                data.splice(at..at, other[from..from + n].iter().copied());
            }
            9 if !other.is_empty() => {
                let from = rng.random_range(0..other.len());
                data.truncate(at);
                data.extend_from_slice(&other[from..]);
            }
            10 if len > 0 => data.truncate(at),
            11 if len > 1 => {
                let j = rng.random_range(0..len);
                data.swap(at, j);
            }
            _ => {
                let n = rng.random_range(1..=8);
                let byte = rng.random();
                data.splice(at..at, std::iter::repeat_n(byte, n));
            }
        }
    }
    data.truncate(target.max_len);
}

/// The next input to try: generated (4 in 10), a mutated pool entry (4 in 10), or a mutated
/// generated one.
pub fn next_input(rng: &mut StdRng, target: &Target, pool: &[Vec<u8>]) -> Vec<u8> {
    let pick = |rng: &mut StdRng| -> Vec<u8> {
        if pool.is_empty() {
            Vec::new()
        } else {
            pool[rng.random_range(0..pool.len())].clone()
        }
    };
    match rng.random_range(0..10) {
        0..=3 => generate(rng, target),
        4..=7 if !pool.is_empty() => {
            let mut input = pick(rng);
            let other = pick(rng);
            mutate(rng, &mut input, &other, target);
            input
        }
        _ => {
            let mut input = generate(rng, target);
            let other = pick(rng);
            mutate(rng, &mut input, &other, target);
            input
        }
    }
}

/// What a run of one target did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Inputs run.
    pub inputs: u64,
    /// Inputs that panicked.
    pub panics: u64,
    /// Distinct panic locations, with the first (minimized) input of each.
    pub crashes: Vec<(Crash, Vec<u8>)>,
    /// Outcome kinds seen.
    pub kinds: HashSet<String>,
    /// Inputs kept because they reached a new kind.
    pub kept: Vec<(String, Vec<u8>)>,
    /// Time spent.
    pub elapsed: Duration,
}

/// Largest input kept in the pool for reaching a new outcome kind.
pub const KEEP_MAX_BYTES: usize = 4_096;

/// Runs `iterations` inputs of `target` from `seed`, starting from the `pool` (corpus) entries.
/// Inputs reaching a new outcome kind join the pool (and `Stats::kept`, at most `keep_max`
/// of them); the first crash at each location is minimized.
pub fn campaign(
    target: &Target,
    seed: u64,
    iterations: u64,
    pool: &mut Vec<Vec<u8>>,
    keep_max: usize,
    mut progress: impl FnMut(&Stats),
) -> Stats {
    let mut rng = rng_for(target, seed);
    let mut stats = Stats::default();
    for input in pool.iter() {
        if let Ok(kind) = run_catching(target, input) {
            stats.kinds.insert(kind);
        }
    }
    let started = Instant::now();
    let mut last_report = Instant::now();
    for _ in 0..iterations {
        let input = next_input(&mut rng, target, pool);
        stats.inputs += 1;
        match run_catching(target, &input) {
            Ok(kind) => {
                if !stats.kinds.contains(&kind) {
                    if input.len() <= KEEP_MAX_BYTES && stats.kept.len() < keep_max {
                        stats.kept.push((kind.clone(), input.clone()));
                        pool.push(input);
                    }
                    stats.kinds.insert(kind);
                }
            }
            Err(crash) => {
                stats.panics += 1;
                if !stats
                    .crashes
                    .iter()
                    .any(|(c, _)| c.location == crash.location)
                {
                    let small = minimize(target, &input, &crash);
                    stats.crashes.push((crash, small));
                }
            }
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            last_report = Instant::now();
            stats.elapsed = started.elapsed();
            progress(&stats);
        }
    }
    stats.elapsed = started.elapsed();
    stats
}

/// `bytes` as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
