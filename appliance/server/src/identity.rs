//! The appliance's identity: a random 128-bit id and a human name, kept in
//! `<data_dir>/identity.toml`.
//!
//! The tax server records which holder each granted number segment belongs to, and the
//! holder is (appliance id, shard): a shard adopts at start the segments granted to its
//! holder that its journal never recorded. The id must therefore follow the data dir
//! (its journals) and nothing else: a new or wiped data dir gets a new id, so it cannot
//! take over another appliance's numbers, and a data dir that still has journals never
//! silently gets a new one, which would orphan the segments its journals hold.
//!
//! The file is written once, durably (temporary file, fsync, link into place, fsync of
//! the directory), before anything else is written in the data dir, and never rewritten.

use rand::Rng;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The identity file's name inside the data dir.
pub const IDENTITY_FILE: &str = "identity.toml";

/// Longest appliance name, in characters.
pub const NAME_CHARS_MAX: usize = 64;

/// Who this appliance is (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Random, never 0 (0 is no appliance's id); the tax server's holder is (id, shard).
    pub id: u128,
    /// A name for people (logs, the control port's status); not unique, not used by
    /// the protocol.
    pub name: String,
}

impl Identity {
    /// The id as the file and the status JSON write it: 32 lowercase hex digits.
    pub fn id_hex(&self) -> String {
        format!("{:032x}", self.id)
    }
}

/// Why the identity could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The identity file exists but is not a valid identity. It is never regenerated:
    /// a new id would orphan the number segments the journals hold.
    #[error("{}: malformed appliance identity ({reason}); restore it from a backup of this data dir (a new identity would orphan the numbers its journals hold)", path.display())]
    Malformed {
        /// The identity file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `create` was asked for a data dir that already has an identity.
    #[error("{} already exists: this data dir already has an appliance identity", path.display())]
    Exists {
        /// The identity file.
        path: PathBuf,
    },
    /// The data dir has journals but no identity file.
    #[error("data dir {} holds journals ({}) but no {IDENTITY_FILE}: it was written by a build without appliance identities, or its identity file was lost; a new identity would orphan the number segments those journals hold at the tax server, so none is created. Restore {IDENTITY_FILE} from a backup of this data dir; if it never had one, keep serving it with the build that wrote it, or start this build on a new, empty data dir", data_dir.display(), journal.display())]
    JournalsWithoutIdentity {
        /// The data dir.
        data_dir: PathBuf,
        /// A journal found in it.
        journal: PathBuf,
    },
    /// The requested name is not acceptable.
    #[error("appliance name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// The file's contents.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityFile {
    id: String,
    name: String,
}

/// Reads the data dir's identity; `None` if it has no identity file.
pub fn load(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            return Err(IdentityError::Malformed {
                path,
                reason: "not UTF-8".into(),
            })
        }
        Err(source) => {
            return Err(IdentityError::Io {
                action: "read",
                path,
                source,
            })
        }
    };
    parse(&text)
        .map(Some)
        .map_err(|reason| IdentityError::Malformed { path, reason })
}

fn parse(text: &str) -> Result<Identity, String> {
    let file: IdentityFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    if file.id.len() != 32 || !file.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("id {:?} is not 32 hex digits", file.id));
    }
    let id = u128::from_str_radix(&file.id, 16).map_err(|e| format!("id: {e}"))?;
    if id == 0 {
        return Err("id is 0, which is no appliance's id".into());
    }
    check_name(&file.name).map_err(|reason| format!("name {:?}: {reason}", file.name))?;
    Ok(Identity {
        id,
        name: file.name,
    })
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.trim().is_empty() {
        Err("empty")
    } else if name.trim() != name {
        Err("leading or trailing white space")
    } else if name.chars().count() > NAME_CHARS_MAX {
        Err("longer than 64 characters")
    } else if name.chars().any(char::is_control) {
        Err("contains control characters")
    } else {
        Ok(())
    }
}

/// A journal in `data_dir`, if any: a `shard-*` directory with something in it, or a
/// journal segment file directly in the data dir (the single-shard `issue-loop`
/// layout).
pub fn find_journal(data_dir: &Path) -> Result<Option<PathBuf>, IdentityError> {
    let io = |source| IdentityError::Io {
        action: "list",
        path: data_dir.to_path_buf(),
        source,
    };
    let entries = match std::fs::read_dir(data_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        if name.starts_with("shard-") && path.is_dir() {
            let mut inside = std::fs::read_dir(&path).map_err(|source| IdentityError::Io {
                action: "list",
                path: path.clone(),
                source,
            })?;
            if inside.next().is_some() {
                found.push(path);
            }
        } else if name.ends_with(crate::journal::SEGMENT_SUFFIX) {
            found.push(path);
        }
    }
    // The first by name, so that the message does not depend on directory order.
    found.sort();
    Ok(found.into_iter().next())
}

/// The name used when none is given: the host name, else `appliance`.
pub fn default_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let host = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    if check_name(&host).is_ok() {
        host
    } else {
        "appliance".to_owned()
    }
}

/// Creates the data dir's identity (`appliance init`): a new random id and `name` (the
/// host name when `None`). Creates the data dir if needed. Refuses when an identity
/// exists, and when the data dir has journals but no identity (see
/// [`IdentityError::JournalsWithoutIdentity`]). The file is durable when this returns.
pub fn create(data_dir: &Path, name: Option<&str>) -> Result<Identity, IdentityError> {
    let name = match name {
        Some(name) => {
            check_name(name).map_err(|reason| IdentityError::InvalidName {
                name: name.to_owned(),
                reason,
            })?;
            name.to_owned()
        }
        None => default_name(),
    };
    let path = data_dir.join(IDENTITY_FILE);
    if path.symlink_metadata().is_ok() {
        return Err(IdentityError::Exists { path });
    }
    if let Some(journal) = find_journal(data_dir)? {
        return Err(IdentityError::JournalsWithoutIdentity {
            data_dir: data_dir.to_path_buf(),
            journal,
        });
    }
    let created_dir = !data_dir.exists();
    std::fs::create_dir_all(data_dir).map_err(|source| IdentityError::Io {
        action: "create directory",
        path: data_dir.to_path_buf(),
        source,
    })?;
    if created_dir {
        // The data dir's own entry must survive a crash too.
        if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    let identity = Identity {
        id: rand::rng().random_range(1..=u128::MAX),
        name,
    };
    let text = format!(
        "# This appliance's identity (appliance init). The tax server knows the number\n\
         # segments it granted by (id, shard): this file belongs to this data dir's\n\
         # journals. Never edit it, never copy it to another data dir, back it up with them.\n{}",
        toml::to_string(&IdentityFile {
            id: identity.id_hex(),
            name: identity.name.clone(),
        })
        .expect("two strings serialise")
    );
    write_new_durably(data_dir, &path, text.as_bytes())?;
    Ok(identity)
}

/// Writes `bytes` to a temporary file, syncs it, links it to `path` (failing if `path`
/// exists: two racing creators cannot both win) and syncs the directory.
fn write_new_durably(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let temp = dir.join(format!(".{IDENTITY_FILE}.{}.tmp", std::process::id()));
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Io {
            action,
            path,
            source,
        }
    };
    let result = (|| {
        let mut file = File::create(&temp).map_err(io("create", &temp))?;
        file.write_all(bytes).map_err(io("write", &temp))?;
        file.sync_all().map_err(io("sync", &temp))?;
        drop(file);
        std::fs::hard_link(&temp, path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io("link", path)(source)
            }
        })
    })();
    let _ = std::fs::remove_file(&temp);
    result?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), IdentityError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| IdentityError::Io {
            action: "sync directory",
            path: dir.to_path_buf(),
            source,
        })
}

/// The data dir's identity, created (with `name`, the host name when `None`) if the
/// data dir has none and no journals; `true` when it was created now.
pub fn load_or_create(
    data_dir: &Path,
    name: Option<&str>,
) -> Result<(Identity, bool), IdentityError> {
    if let Some(identity) = load(data_dir)? {
        return Ok((identity, false));
    }
    create(data_dir, name).map(|identity| (identity, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_round_trips_and_is_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (created, fresh) = load_or_create(&data, Some("north-1")).unwrap();
        assert!(fresh);
        assert_ne!(created.id, 0);
        assert_eq!(created.name, "north-1");
        assert_eq!(created.id_hex().len(), 32);
        let (loaded, fresh) = load_or_create(&data, Some("other")).unwrap();
        assert!(!fresh);
        assert_eq!(loaded, created);
        assert_eq!(load(&data).unwrap(), Some(created.clone()));
        // The file is the only thing left behind (no temporary file).
        let names: Vec<_> = std::fs::read_dir(&data)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(IDENTITY_FILE)]);
        let text = std::fs::read_to_string(data.join(IDENTITY_FILE)).unwrap();
        assert!(
            text.contains(&format!("id = \"{}\"", created.id_hex())),
            "{text}"
        );
    }

    #[test]
    fn a_create_interrupted_before_its_link_leaves_no_identity_behind() {
        // A crash between writing the temporary file and linking it into place: the
        // identity does not exist (no half-written identity.toml is ever visible), and
        // the next create succeeds.
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(format!(".{IDENTITY_FILE}.999999999.tmp"));
        std::fs::write(&stale, "id = \"0123").unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let (identity, created) = load_or_create(dir.path(), Some("x")).unwrap();
        assert!(created);
        assert_eq!(load(dir.path()).unwrap(), Some(identity));
    }

    #[test]
    fn two_data_dirs_get_different_ids() {
        let dir = tempfile::tempdir().unwrap();
        let a = create(&dir.path().join("a"), None).unwrap();
        let b = create(&dir.path().join("b"), None).unwrap();
        assert_ne!(a.id, b.id);
        assert!(!a.name.is_empty());
    }

    #[test]
    fn a_second_create_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let first = create(dir.path(), Some("a")).unwrap();
        let before = std::fs::read(dir.path().join(IDENTITY_FILE)).unwrap();
        assert!(matches!(
            create(dir.path(), Some("b")),
            Err(IdentityError::Exists { .. })
        ));
        assert_eq!(
            std::fs::read(dir.path().join(IDENTITY_FILE)).unwrap(),
            before
        );
        assert_eq!(load(dir.path()).unwrap(), Some(first));
    }

    #[test]
    fn a_malformed_identity_is_refused_never_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(IDENTITY_FILE);
        let good = "0123456789abcdef0123456789abcdef";
        for text in [
            "".to_owned(),
            "id = \"0123\"\nname = \"x\"\n".to_owned(),
            format!("id = \"{}\"\nname = \"x\"\n", "0".repeat(32)),
            format!("id = \"{}\"\nname = \"x\"\n", "g".repeat(32)),
            format!("id = \"{good}\"\nname = \"\"\n"),
            format!("id = \"{good}\"\nname = \"x\"\nextra = 1\n"),
            format!("id = \"{good}\"\n"),
            "not toml at all".to_owned(),
        ] {
            std::fs::write(&path, &text).unwrap();
            let err = load_or_create(dir.path(), None).unwrap_err();
            assert!(
                matches!(err, IdentityError::Malformed { .. }),
                "{text:?}: {err}"
            );
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(IdentityError::Malformed { .. })
        ));
        std::fs::write(&path, format!("id = \"{good}\"\nname = \"x\"\n")).unwrap();
        assert_eq!(
            load(dir.path()).unwrap(),
            Some(Identity {
                id: 0x0123456789abcdef0123456789abcdef,
                name: "x".into()
            })
        );
    }

    #[test]
    fn journals_without_an_identity_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // An empty shard dir (a start that failed early) is no journal.
        std::fs::create_dir_all(dir.path().join("shard-0")).unwrap();
        std::fs::write(dir.path().join("shards"), "1\n").unwrap();
        assert_eq!(find_journal(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join("shard-0/00000000000000000001.journal"),
            b"x",
        )
        .unwrap();
        let err = load_or_create(dir.path(), None).unwrap_err();
        assert!(
            matches!(&err, IdentityError::JournalsWithoutIdentity { journal, .. } if journal.ends_with("shard-0")),
            "{err}"
        );
        assert!(err.to_string().contains("Restore identity.toml"), "{err}");
        assert!(!dir.path().join(IDENTITY_FILE).exists());
        // The single-shard layout: segments directly in the data dir.
        let flat = tempfile::tempdir().unwrap();
        std::fs::write(flat.path().join("00000000000000000001.journal"), b"x").unwrap();
        assert!(matches!(
            create(flat.path(), None),
            Err(IdentityError::JournalsWithoutIdentity { .. })
        ));
    }

    #[test]
    fn bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", " padded", "line\nbreak", &"x".repeat(65)] {
            assert!(matches!(
                create(dir.path(), Some(name)),
                Err(IdentityError::InvalidName { .. })
            ));
        }
        assert!(!dir.path().join(IDENTITY_FILE).exists());
        create(dir.path(), Some(&"x".repeat(64))).unwrap();
    }
}
