//! The checkpoint's journal: `<file>.journal` beside the snapshot
//! `<file>`, holding what changed since that snapshot, one record per
//! write.
//!
//! A write of the group commit appends one line and syncs it, so its cost
//! follows the decisions it carries, not the number of intents; the
//! snapshot is rewritten (and the journal emptied) only when the journal
//! would outgrow it, which keeps the bytes written per decision bounded
//! and a load at most one snapshot plus as many journal bytes.
//!
//! Line format (JSON, one per line):
//!
//! ```json
//! {"crc32":"…","record":{"from":7,"to":8,"upsert":[…intents…],"remove":[{"named":"vm-b"}]}}
//! ```
//!
//! `record` takes the intents from generation `from` to generation `to`:
//! every intent in `upsert` (the file's intent form) replaces or adds the
//! intent of its VM, every key in `remove` drops one. `crc32` is CRC-32
//! (IEEE) of the exact bytes of `record`.
//!
//! Replay onto a snapshot at generation `G`: records whose `to` is at most
//! `G` were written before that snapshot and are skipped (a crash between
//! the snapshot's rename and the journal's truncation leaves them); the
//! next must start at `G` exactly and each one after it where the one
//! before ended. Lines that do not parse or fail their checksum are a torn
//! append when no good record follows them (a crash mid-append: that write
//! was never acknowledged) and are ignored; followed by a good record they
//! are corruption.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{crc_hex, Checkpoint, IntentRecord, StoredKey};
use crate::VmId;

/// Appended to the checkpoint's file name to name its journal.
pub const JOURNAL_SUFFIX: &str = ".journal";

/// What one write changed: the intents from generation `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The generation the change applies to.
    pub from: u64,
    /// The generation after it.
    pub to: u64,
    /// Intents added or replaced, sorted by VM id.
    pub upserts: Vec<Arc<IntentRecord>>,
    /// VMs whose intents are dropped, sorted.
    pub removes: Vec<VmId>,
}

impl Delta {
    /// The change from `old` to `new`, both sorted by VM id as a
    /// [`Checkpoint`] keeps them: one merge pass, in which an intent the
    /// two share (the same `Arc`, as a staged checkpoint shares every
    /// intent it did not change) is equal without being compared.
    pub fn between(old: &Checkpoint, new: &Checkpoint) -> Self {
        let mut upserts = Vec::new();
        let mut removes = Vec::new();
        let (mut a, mut b) = (old.intents.iter().peekable(), new.intents.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(o), None) => {
                    removes.push(o.vm_id.clone());
                    a.next();
                }
                (None, Some(n)) => {
                    upserts.push(Arc::clone(n));
                    b.next();
                }
                (Some(o), Some(n)) => match o.vm_id.cmp(&n.vm_id) {
                    std::cmp::Ordering::Less => {
                        removes.push(o.vm_id.clone());
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        upserts.push(Arc::clone(n));
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if !Arc::ptr_eq(o, n) && o != n {
                            upserts.push(Arc::clone(n));
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        Self {
            from: old.generation,
            to: new.generation,
            upserts,
            removes,
        }
    }

    /// Applies the change to `checkpoint` (at generation `from`).
    pub fn apply_to(&self, checkpoint: &mut Checkpoint) {
        for id in &self.removes {
            checkpoint.remove(id);
        }
        for intent in &self.upserts {
            checkpoint.upsert_shared(Arc::clone(intent));
        }
        checkpoint.generation = self.to;
    }
}

#[derive(Serialize)]
struct RecordOut<'a> {
    from: u64,
    to: u64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    upsert: &'a [Arc<IntentRecord>],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    remove: Vec<StoredKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordIn {
    from: u64,
    to: u64,
    #[serde(default)]
    upsert: Vec<IntentRecord>,
    #[serde(default)]
    remove: Vec<StoredKey>,
}

#[derive(Serialize)]
struct LineOut<'a> {
    crc32: String,
    record: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn {
    crc32: String,
    record: Box<serde_json::value::RawValue>,
}

/// The journal line of `delta`, newline included.
pub fn encode_line(delta: &Delta) -> Result<Vec<u8>, serde_json::Error> {
    let record = serde_json::to_string(&RecordOut {
        from: delta.from,
        to: delta.to,
        upsert: &delta.upserts,
        remove: delta.removes.iter().map(StoredKey::of_id).collect(),
    })?;
    let raw = serde_json::value::RawValue::from_string(record)?;
    let mut out = serde_json::to_vec(&LineOut {
        crc32: crc_hex(raw.get().as_bytes()),
        record: &raw,
    })?;
    out.push(b'\n');
    Ok(out)
}

/// One line, checked and parsed.
fn decode_line(line: &[u8]) -> Result<Delta, String> {
    let parsed: LineIn = serde_json::from_slice(line).map_err(|e| format!("not a record: {e}"))?;
    let computed = crc_hex(parsed.record.get().as_bytes());
    if !parsed.crc32.eq_ignore_ascii_case(&computed) {
        return Err(format!(
            "checksum mismatch: stored crc32 {}, computed {computed}",
            parsed.crc32
        ));
    }
    let record: RecordIn =
        serde_json::from_str(parsed.record.get()).map_err(|e| format!("bad record: {e}"))?;
    if record.to <= record.from {
        return Err(format!(
            "record from generation {} to {} does not move forward",
            record.from, record.to
        ));
    }
    let removes = record
        .remove
        .into_iter()
        .map(StoredKey::into_id)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Delta {
        from: record.from,
        to: record.to,
        upserts: record.upsert.into_iter().map(Arc::new).collect(),
        removes,
    })
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Records applied.
    pub applied: usize,
    /// Records skipped as older than the snapshot.
    pub skipped: usize,
    /// Bytes of a torn append at the end, ignored.
    pub torn_bytes: usize,
}

/// Applies the journal `bytes` to `checkpoint` (the snapshot); an error
/// names the line (from 1) and the fault.
pub fn replay(bytes: &[u8], checkpoint: &mut Checkpoint) -> Result<Replayed, String> {
    // (line number, offset after the line and its newline, the record)
    let mut lines: Vec<(usize, usize, Result<Delta, String>)> = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let decoded = match rest.iter().position(|&b| b == b'\n') {
            Some(end) => {
                at += end + 1;
                decode_line(&rest[..end])
            }
            None => {
                // No newline: the append did not finish.
                at = bytes.len();
                Err("no newline at the end".to_string())
            }
        };
        lines.push((lines.len() + 1, at, decoded));
    }
    let last_good = lines.iter().rposition(|(_, _, d)| d.is_ok());
    let mut report = Replayed {
        torn_bytes: bytes.len() - last_good.map_or(0, |g| lines[g].1),
        ..Replayed::default()
    };
    let mut chained = false;
    for (i, (number, _, decoded)) in lines.into_iter().enumerate() {
        let delta = match decoded {
            Ok(d) => d,
            Err(e) if last_good.is_some_and(|g| i < g) => {
                return Err(format!(
                    "journal line {number}: {e}, with good records after it"
                ));
            }
            // The torn append at the end.
            Err(_) => break,
        };
        if !chained && delta.to <= checkpoint.generation {
            report.skipped += 1;
            continue;
        }
        if delta.from != checkpoint.generation {
            return Err(format!(
                "journal line {number}: record from generation {} to {} does not follow generation {}",
                delta.from, delta.to, checkpoint.generation
            ));
        }
        delta.apply_to(checkpoint);
        chained = true;
        report.applied += 1;
    }
    Ok(report)
}
