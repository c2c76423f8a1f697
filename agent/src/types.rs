//! Value types shared by every module: VM ids and confidential classes.

use std::fmt;
use std::str::FromStr;

/// The orchestrator's name for a VM: 1 to 128 bytes of `[A-Za-z0-9._:-]`.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct VmId(String);

/// Why a VM id was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmIdError {
    /// Empty id.
    #[error("vm_id is empty")]
    Empty,
    /// Id longer than 128 bytes.
    #[error("vm_id is longer than 128 bytes")]
    TooLong,
    /// Id with a character outside `[A-Za-z0-9._:-]`.
    #[error("vm_id contains {0:?}; allowed are letters, digits and . _ : -")]
    BadChar(char),
}

impl VmId {
    /// Validates `s` as a VM id.
    pub fn new(s: impl Into<String>) -> Result<Self, VmIdError> {
        let s = s.into();
        if s.is_empty() {
            return Err(VmIdError::Empty);
        }
        if s.len() > 128 {
            return Err(VmIdError::TooLong);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')))
        {
            return Err(VmIdError::BadChar(c));
        }
        Ok(Self(s))
    }

    /// The id as text.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmId {
    type Error = VmIdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<VmId> for String {
    fn from(v: VmId) -> String {
        v.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How the agent names a VM: by the orchestrator's id, or by its process
/// when no orchestrator named it (unmanaged VMs, and VMs auto placement
/// placed). On the wire a process key is `pid-<N>`; that form is reserved
/// for it, so an orchestrator id never reads as a process key
/// ([`VmKey::parse`], [`VmKey::named`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum VmKey {
    /// The orchestrator's id (never of the form `pid-<N>`).
    Named(VmId),
    /// The pid of a VM process no orchestrator named.
    Process(u32),
}

/// The wire prefix of a process key.
pub(crate) const PROCESS_KEY_PREFIX: &str = "pid-";

/// Why a string is not a VM key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum VmKeyError {
    /// Not a valid VM id.
    #[error(transparent)]
    Id(#[from] VmIdError),
    /// An orchestrator id of the `pid-<N>` form, which names processes only.
    #[error(
        "vm_id {0:?} has the form pid-<N>, which names a VM by its process; choose another id"
    )]
    ReservedForProcess(String),
}

/// The pid of a `pid-<N>` string (digits only, no sign, no leading zero).
fn process_key_pid(s: &str) -> Option<u32> {
    let digits = s.strip_prefix(PROCESS_KEY_PREFIX)?;
    if digits.is_empty()
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok().filter(|&p| p != 0)
}

impl VmKey {
    /// A key from its wire form: `pid-<N>` is a process key, anything
    /// else a valid [`VmId`].
    pub(crate) fn parse(s: &str) -> Result<Self, VmIdError> {
        match process_key_pid(s) {
            Some(pid) => Ok(Self::Process(pid)),
            None => VmId::new(s).map(Self::Named),
        }
    }

    /// An orchestrator's id for a new VM: a valid [`VmId`] that does not
    /// read as a process key.
    pub(crate) fn named(s: &str) -> Result<VmId, VmKeyError> {
        if process_key_pid(s).is_some() {
            return Err(VmKeyError::ReservedForProcess(s.to_string()));
        }
        Ok(VmId::new(s)?)
    }

    /// The key of an intent stored under `id`: process keys are stored as
    /// their wire form.
    pub(crate) fn of_id(id: &VmId) -> Self {
        match process_key_pid(id.as_str()) {
            Some(pid) => Self::Process(pid),
            None => Self::Named(id.clone()),
        }
    }

    /// The id an intent of this key is stored under.
    pub(crate) fn to_id(&self) -> VmId {
        match self {
            Self::Named(id) => id.clone(),
            Self::Process(pid) => VmId(format!("{PROCESS_KEY_PREFIX}{pid}")),
        }
    }
}

impl fmt::Display for VmKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Named(id) => f.write_str(id.as_str()),
            Self::Process(pid) => write!(f, "{PROCESS_KEY_PREFIX}{pid}"),
        }
    }
}

/// Memory-encryption class of a guest.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum ConfidentialClass {
    /// A plain VM.
    None,
    /// SEV: memory encrypted, register state not.
    Sev,
    /// SEV-ES: register state encrypted too.
    SevEs,
    /// SEV-SNP: integrity protected; firmware handles reclaim flushes.
    SevSnp,
}

impl ConfidentialClass {
    pub(crate) const ALL: [Self; 4] = [Self::None, Self::Sev, Self::SevEs, Self::SevSnp];

    /// Every class, plain first.
    /// Whether the class belongs in the confidential pool.
    pub(crate) fn is_confidential(self) -> bool {
        self != Self::None
    }

    /// The name used on the command line, in sysfs and in metrics labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Sev => "sev",
            Self::SevEs => "sev-es",
            Self::SevSnp => "sev-snp",
        }
    }
}

impl fmt::Display for ConfidentialClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown confidential class name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown confidential class {0:?}; expected none, sev, sev-es or sev-snp")]
pub struct ClassError(pub String);

impl FromStr for ConfidentialClass {
    type Err = ClassError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| ClassError(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids() {
        assert!(VmId::new("vm-1.a_b:c").is_ok());
        assert_eq!(VmId::new(""), Err(VmIdError::Empty));
        assert_eq!(VmId::new("a/b"), Err(VmIdError::BadChar('/')));
        assert_eq!(VmId::new("x".repeat(129)), Err(VmIdError::TooLong));
    }

    #[test]
    fn process_keys_and_names_do_not_collide() {
        assert_eq!(VmKey::parse("pid-42"), Ok(VmKey::Process(42)));
        assert_eq!(
            VmKey::parse("vm-42"),
            Ok(VmKey::Named(VmId::new("vm-42").unwrap()))
        );
        // Not the canonical form of a pid: an ordinary name.
        for name in ["pid-042", "pid-", "pid-0", "pid-x", "pid-99999999999"] {
            assert_eq!(
                VmKey::parse(name),
                Ok(VmKey::Named(VmId::new(name).unwrap())),
                "{name}"
            );
            assert!(VmKey::named(name).is_ok(), "{name}");
        }
        assert_eq!(
            VmKey::named("pid-42"),
            Err(VmKeyError::ReservedForProcess("pid-42".into()))
        );
        assert_eq!(VmKey::parse("a/b"), Err(VmIdError::BadChar('/')));
        let key = VmKey::Process(42);
        assert_eq!(key.to_string(), "pid-42");
        assert_eq!(VmKey::of_id(&key.to_id()), key);
        let named = VmKey::Named(VmId::new("db-1").unwrap());
        assert_eq!(VmKey::of_id(&named.to_id()), named);
    }

    #[test]
    fn classes_round_trip() {
        for c in ConfidentialClass::ALL {
            assert_eq!(c.as_str().parse::<ConfidentialClass>(), Ok(c));
        }
        assert!("sev_es".parse::<ConfidentialClass>().is_err());
    }
}
