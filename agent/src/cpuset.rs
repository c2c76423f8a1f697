//! `CpuSet`: a set of CPU ids, and the kernel's cpulist format (`0-3,8,10-11`).
//!
//! The same format is used by sysfs (`shared_cpu_list`, `online`), cgroup
//! `cpuset.cpus`, `/proc/<pid>/status` `Cpus_allowed_list` and the sevflush
//! ABI, so one parser serves all of them.

use std::fmt;

/// Largest CPU id accepted (the kernel's `NR_CPUS` maximum is 8192).
pub(crate) const MAX_CPU_ID: u32 = 8191;

/// `n`, a count or index of CPUs, cores, L3 domains, NUMA nodes, vCPU
/// threads or processes, as a `u32` (the API's and the module's width).
// Each is bounded by the number of CPU ids or of pids, both u32: no truncation.
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn count_u32(n: usize) -> u32 {
    n as u32
}

/// Why a cpulist was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// A token is not a number or a `lo-hi` range.
    #[error("bad cpulist token {token:?}: {reason}")]
    BadToken { token: String, reason: &'static str },
}

/// A set of CPU ids, stored as a bitmap. Iteration is in ascending order.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CpuSet {
    /// Bit `i % 64` of word `i / 64` is CPU `i`; no trailing zero words, so
    /// equal sets have equal representations.
    words: Vec<u64>,
}

impl CpuSet {
    /// The empty set.
    pub const fn new() -> Self {
        Self { words: Vec::new() }
    }

    /// `lo..=hi`.
    pub fn range(lo: u32, hi: u32) -> Self {
        (lo..=hi).collect()
    }

    fn trim(&mut self) {
        while self.words.last() == Some(&0) {
            self.words.pop();
        }
    }

    /// Adds `cpu`; returns whether it was absent.
    pub fn insert(&mut self, cpu: u32) -> bool {
        let (w, b) = ((cpu / 64) as usize, cpu % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        let absent = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        absent
    }

    /// Removes `cpu`; returns whether it was present.
    #[cfg(test)]
    pub(crate) fn remove(&mut self, cpu: u32) -> bool {
        let (w, b) = ((cpu / 64) as usize, cpu % 64);
        let present = self.contains(cpu);
        if present {
            self.words[w] &= !(1 << b);
            self.trim();
        }
        present
    }

    /// Whether `cpu` is in the set.
    pub fn contains(&self, cpu: u32) -> bool {
        let (w, b) = ((cpu / 64) as usize, cpu % 64);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    /// Number of CPUs in the set.
    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set holds no CPU.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Lowest CPU id in the set.
    pub fn first(&self) -> Option<u32> {
        self.iter().next()
    }

    /// The CPU ids, ascending.
    // Word `i` exists only for a u32 CPU id in it, so `i * 64` fits a u32.
    #[allow(clippy::cast_possible_truncation)]
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                Some(i as u32 * 64 + b)
            })
        })
    }

    fn zip_with(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        let n = self.words.len().max(other.words.len());
        let get = |v: &Vec<u64>, i| v.get(i).copied().unwrap_or(0);
        let mut out = Self {
            words: (0..n)
                .map(|i| f(get(&self.words, i), get(&other.words, i)))
                .collect(),
        };
        out.trim();
        out
    }

    /// CPUs in either set.
    pub fn union(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a | b)
    }

    /// CPUs in both sets.
    pub fn intersection(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a & b)
    }

    /// CPUs of this set that are not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        self.zip_with(other, |a, b| a & !b)
    }

    /// Whether every CPU of this set is in `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        self.difference(other).is_empty()
    }

    /// Whether the sets share no CPU.
    pub fn is_disjoint(&self, other: &Self) -> bool {
        self.intersection(other).is_empty()
    }

    /// Parses a cpulist such as `0-3,8,10-11`. Surrounding whitespace and an
    /// empty string (the empty set) are accepted; anything else that is not
    /// `N` or `LO-HI` with `LO <= HI <= MAX_CPU_ID` is an error naming the
    /// token.
    pub fn parse(s: &str) -> Result<Self, CpuListError> {
        let mut set = Self::new();
        let s = s.trim();
        if s.is_empty() {
            return Ok(set);
        }
        for token in s.split(',') {
            let bad = |reason| CpuListError::BadToken {
                token: token.to_string(),
                reason,
            };
            let num = |t: &str| -> Result<u32, CpuListError> {
                if t.is_empty() || !t.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(bad("not a decimal CPU id"));
                }
                let n: u32 = t.parse().map_err(|_| bad("CPU id out of range"))?;
                if n > MAX_CPU_ID {
                    return Err(bad("CPU id out of range"));
                }
                Ok(n)
            };
            match token.split_once('-') {
                None => {
                    set.insert(num(token)?);
                }
                Some((lo, hi)) => {
                    let (lo, hi) = (num(lo)?, num(hi)?);
                    if lo > hi {
                        return Err(bad("range start above its end"));
                    }
                    for c in lo..=hi {
                        set.insert(c);
                    }
                }
            }
        }
        Ok(set)
    }

    /// Parses a hexadecimal cpumask such as `Cpus_allowed: ff,ffffffff`.
    pub(crate) fn parse_mask(s: &str) -> Result<Self, CpuListError> {
        let mut set = Self::new();
        let groups: Vec<&str> = s.trim().split(',').collect();
        for (i, g) in groups.iter().rev().enumerate() {
            let bad = |reason| CpuListError::BadToken {
                token: g.to_string(),
                reason,
            };
            if g.is_empty() || g.len() > 8 {
                return Err(bad("not a 32-bit hex group"));
            }
            let v = u32::from_str_radix(g, 16).map_err(|_| bad("not a 32-bit hex group"))?;
            for b in 0..32 {
                if v & (1 << b) != 0 {
                    // Group `i` holds CPUs 32 i .. 32 i + 31; past u32, it
                    // is out of range like any id above MAX_CPU_ID.
                    let cpu = u32::try_from(i)
                        .ok()
                        .and_then(|i| i.checked_mul(32))
                        .map_or(u32::MAX, |base| base + b);
                    if cpu > MAX_CPU_ID {
                        return Err(bad("CPU id out of range"));
                    }
                    set.insert(cpu);
                }
            }
        }
        Ok(set)
    }

    /// The CPU ids as a vector, ascending (the API's `repeated uint32`).
    pub fn to_vec(&self) -> Vec<u32> {
        self.iter().collect()
    }

    /// Builds a set from API input, rejecting ids above `MAX_CPU_ID`.
    pub(crate) fn try_from_ids(ids: &[u32]) -> Result<Self, CpuListError> {
        let mut set = Self::new();
        for &c in ids {
            if c > MAX_CPU_ID {
                return Err(CpuListError::BadToken {
                    token: c.to_string(),
                    reason: "CPU id out of range",
                });
            }
            set.insert(c);
        }
        Ok(set)
    }
}

impl FromIterator<u32> for CpuSet {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        let mut set = Self::new();
        for c in iter {
            set.insert(c);
        }
        set
    }
}

impl std::str::FromStr for CpuSet {
    type Err = CpuListError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Formats as a cpulist (`0-3,8`); the empty set is the empty string.
impl fmt::Display for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut it = self.iter().peekable();
        while let Some(lo) = it.next() {
            let mut hi = lo;
            while it.peek() == Some(&(hi + 1)) {
                hi += 1;
                it.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuSet({self})")
    }
}

impl serde::Serialize for CpuSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for CpuSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_formats() {
        let cases = [
            ("", ""),
            ("0", "0"),
            ("0-3,8", "0-3,8"),
            ("8,0-3", "0-3,8"),
            (" 0-1,2-3\n", "0-3"),
            ("5-5", "5"),
            ("0,2,4", "0,2,4"),
            ("63-65", "63-65"),
        ];
        for (input, want) in cases {
            assert_eq!(CpuSet::parse(input).unwrap().to_string(), want, "{input:?}");
        }
    }

    #[test]
    fn rejects_malformed_tokens_by_name() {
        let cases = [
            ("0-", "0-"),
            ("a", "a"),
            ("1,,2", ""),
            ("3-1", "3-1"),
            ("1-2-3", "1-2-3"),
            ("-1", "-1"),
            ("99999", "99999"),
            ("0,+1", "+1"),
            ("1 2", "1 2"),
        ];
        for (input, token) in cases {
            match CpuSet::parse(input) {
                Err(CpuListError::BadToken { token: t, .. }) => assert_eq!(t, token, "{input:?}"),
                Ok(s) => panic!("{input:?} parsed as {s}"),
            }
        }
    }

    #[test]
    fn hex_mask() {
        assert_eq!(CpuSet::parse_mask("ff").unwrap().to_string(), "0-7");
        assert_eq!(
            CpuSet::parse_mask("00000001,00000003").unwrap().to_string(),
            "0-1,32"
        );
        assert!(CpuSet::parse_mask("xyz").is_err());
        assert!(CpuSet::parse_mask("").is_err());
    }

    #[test]
    fn set_operations() {
        let a = CpuSet::parse("0-7").unwrap();
        let b = CpuSet::parse("4-11").unwrap();
        assert_eq!(a.union(&b).to_string(), "0-11");
        assert_eq!(a.intersection(&b).to_string(), "4-7");
        assert_eq!(a.difference(&b).to_string(), "0-3");
        assert!(CpuSet::parse("1-2").unwrap().is_subset(&a));
        assert!(!a.is_subset(&b));
        let mut c = CpuSet::parse("100").unwrap();
        assert!(c.remove(100));
        assert_eq!(c, CpuSet::new());
    }

    proptest! {
        #[test]
        fn round_trip(ids in proptest::collection::btree_set(0u32..=MAX_CPU_ID, 0..200)) {
            let set: CpuSet = ids.iter().copied().collect();
            let text = set.to_string();
            let back = CpuSet::parse(&text).unwrap();
            prop_assert_eq!(&back, &set);
            prop_assert_eq!(back.to_vec(), ids.into_iter().collect::<Vec<_>>());
        }

        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = CpuSet::parse(&s);
            let _ = CpuSet::parse_mask(&s);
        }

        #[test]
        fn error_names_a_token_of_the_input(s in "[0-9,\\- a-z]{0,20}") {
            if let Err(CpuListError::BadToken { token, .. }) = CpuSet::parse(&s) {
                prop_assert!(s.trim().split(',').any(|t| t == token));
            }
        }
    }
}
