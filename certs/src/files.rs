//! Reading PEM files and writing certificate and key files.
//!
//! Files are written to a temporary name in the same directory and renamed into place, so a
//! reader never sees half a key, and a key file has mode 0600 from the moment it exists.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// Mode of private key files: only the owner may read them.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode of certificate files (further narrowed by the umask).
pub(crate) const CERT_MODE: u32 = 0o644;

/// The first certificate in a PEM file.
pub(crate) fn read_certificate(
    path: &Path,
    what: &'static str,
) -> Result<CertificateDer<'static>, CertError> {
    CertificateDer::from_pem_file(path).map_err(|e| pem_error(e, path, what, "certificate"))
}

/// All certificates in a PEM file, in file order; at least one.
pub(crate) fn read_chain(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(e, path, what, "certificate"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, path, what, "certificate"))?;
    if chain.is_empty() {
        return Err(CertError::NoPem {
            what: "certificate",
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM file.
pub(crate) fn read_private_key(
    path: &Path,
    what: &'static str,
) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(e, path, what, "private key"))
}

fn pem_error(error: pem::Error, path: &Path, what: &'static str, item: &'static str) -> CertError {
    match error {
        pem::Error::Io(error) => CertError::Read {
            what,
            path: path.to_owned(),
            error,
        },
        pem::Error::NoItemsFound => CertError::NoPem {
            what: item,
            path: path.to_owned(),
        },
        other => CertError::BadPem {
            path: path.to_owned(),
            reason: pem_reason(&other),
        },
    }
}

fn pem_reason(error: &pem::Error) -> String {
    match error {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "a section is missing its {} line",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "malformed section start line {}",
            String::from_utf8_lossy(line)
        ),
        pem::Error::Base64Decode(reason) => format!("bad base64 ({reason})"),
        pem::Error::SectionTooLarge => "a section is larger than 256 MB".to_owned(),
        other => format!("{other:?}"),
    }
}

/// Creates `dir` and its parents if they do not exist.
pub(crate) fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|error| CertError::Write {
        what: "directory",
        path: dir.to_owned(),
        error,
    })
}

/// Whether anything (even a dangling symlink) is at `path`.
pub(crate) fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Atomically replaces `path` with `contents`; the file is created with `mode`.
pub(crate) fn write_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    what: &'static str,
) -> Result<(), CertError> {
    let tmp = temp_path(path);
    let result = write_new(&tmp, contents, mode).and_then(|()| fs::rename(&tmp, path));
    result.map_err(|error| {
        // Best effort: the temporary may not exist if creating it is what failed.
        let _ = fs::remove_file(&tmp);
        CertError::Write {
            what,
            path: path.to_owned(),
            error,
        }
    })
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    // A temporary left by a crashed run of this same pid would block create_new.
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn write_file_replaces_content_and_sets_mode_on_the_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.key");
        fs::write(&path, b"old").expect("seed");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).expect("chmod");

        write_file(&path, b"new", KEY_MODE, "key file").expect("write");

        assert_eq!(fs::read(&path).expect("read"), b"new");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("a.key")]);
    }

    #[test]
    fn write_into_missing_directory_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("missing").join("a.pem");
        let err = write_file(&path, b"x", CERT_MODE, "certificate file").expect_err("must fail");
        let text = err.to_string();
        assert!(text.starts_with("cannot write certificate file "), "{text}");
        assert!(text.contains("missing/a.pem"), "{text}");
    }

    #[test]
    fn pem_without_certificates_is_reported_as_such() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("junk.pem");
        fs::write(&path, "not pem at all\n").expect("write");
        let err = read_certificate(&path, "certificate").expect_err("must fail");
        assert_eq!(
            err.to_string(),
            format!("{} holds no PEM certificate", path.display())
        );
    }
}
