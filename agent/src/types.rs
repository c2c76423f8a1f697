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
    #[error("vm_id is empty")]
    Empty,
    #[error("vm_id is longer than 128 bytes")]
    TooLong,
    #[error("vm_id contains {0:?}; allowed are letters, digits and . _ : -")]
    BadChar(char),
}

impl VmId {
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

    pub fn as_str(&self) -> &str {
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
    pub const ALL: [Self; 4] = [Self::None, Self::Sev, Self::SevEs, Self::SevSnp];

    /// Whether the class belongs in the confidential pool.
    pub fn is_confidential(self) -> bool {
        self != Self::None
    }

    /// The name used on the command line, in sysfs and in metrics labels.
    pub fn as_str(self) -> &'static str {
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
    fn classes_round_trip() {
        for c in ConfidentialClass::ALL {
            assert_eq!(c.as_str().parse::<ConfidentialClass>(), Ok(c));
        }
        assert!("sev_es".parse::<ConfidentialClass>().is_err());
    }
}
