//! The zip container around `rdml_data.xml`, in memory.

use std::io::{Cursor, Read, Write};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipArchive, ZipWriter};

use super::{DATA_FILE_NAME, RdmlError};

/// Most bytes reserved up front for the decompressed XML. The size in the zip header
/// is the archive's claim, not a fact: a crafted header must not make us allocate the
/// whole limit before a byte has been inflated.
const MAX_PREALLOCATION: u64 = 16 * 1024 * 1024;

/// Whether `bytes` start with a zip signature: a local file header (`PK\x03\x04`) or,
/// for an archive with no entries, the end of central directory (`PK\x05\x06`)
/// (PKWARE APPNOTE.TXT 4.3.7 and 4.3.16).
pub(super) fn is_zip(bytes: &[u8]) -> bool {
    bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06")
}

/// The decompressed `rdml_data.xml` of a zip archive, at most `limit` bytes.
pub(super) fn unzip_rdml_data(bytes: &[u8], limit: u64) -> Result<Vec<u8>, RdmlError> {
    let zip_error = |e: zip::result::ZipError| RdmlError::Zip {
        reason: e.to_string(),
    };
    let mut archive = ZipArchive::new(Cursor::new(bytes)).map_err(zip_error)?;
    let entries = archive
        .file_names()
        .take(20)
        .map(|name| name.map_or_else(|_| "(an unreadable name)".to_owned(), |n| crate::echo(&n)))
        .collect::<Vec<_>>()
        .join(", ");
    let file = match archive.by_name(DATA_FILE_NAME) {
        Ok(file) => file,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(RdmlError::MissingRdmlData { entries });
        }
        Err(e) => return Err(zip_error(e)),
    };
    if file.size() > limit {
        return Err(RdmlError::TooLarge { limit });
    }
    let capacity = usize::try_from(file.size().min(MAX_PREALLOCATION)).unwrap_or(0);
    let mut xml = Vec::with_capacity(capacity);
    // Read one byte past the limit, whatever the header claims: the bounded reader is
    // what stops a zip bomb.
    file.take(limit.saturating_add(1))
        .read_to_end(&mut xml)
        .map_err(|e| RdmlError::Zip {
            reason: format!("{DATA_FILE_NAME}: {e}"),
        })?;
    if xml.len() as u64 > limit {
        return Err(RdmlError::TooLarge { limit });
    }
    Ok(xml)
}

/// A zip archive holding `xml` as `rdml_data.xml`, deflated, dated 1980-01-01 (the DOS
/// epoch) so the bytes depend on the content only.
pub(super) fn zip_rdml_data(xml: &str) -> Vec<u8> {
    let options = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Deflated)
        .last_modified_time(DateTime::default())
        // Zip64 only when the XML needs it (over 4 GiB), so ordinary files stay
        // readable by every zip reader.
        .large_file(xml.len() as u64 >= u64::from(u32::MAX));
    // The sink is a Vec, deflate into memory cannot fail, the name is fixed and valid,
    // and sizes past 4 GiB get zip64 above: there is no error left to report.
    zip_into_vec(xml, options).expect("writing a zip archive into memory cannot fail")
}

fn zip_into_vec(xml: &str, options: SimpleFileOptions) -> zip::result::ZipResult<Vec<u8>> {
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    zip.start_file(DATA_FILE_NAME, options)?;
    zip.write_all(xml.as_bytes())?;
    Ok(zip.finish()?.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zip_round_trip_and_determinism() {
        let xml = "<rdml version=\"1.3\"/>".repeat(100);
        let a = zip_rdml_data(&xml);
        let b = zip_rdml_data(&xml);
        assert_eq!(a, b);
        assert!(is_zip(&a));
        assert!(a.len() < xml.len(), "deflated: {} bytes", a.len());
        assert_eq!(unzip_rdml_data(&a, 1 << 20).unwrap(), xml.as_bytes());
    }

    #[test]
    fn limit_is_enforced_on_the_inflated_size() {
        let xml = "x".repeat(10_000);
        let zipped = zip_rdml_data(&xml);
        assert_eq!(
            unzip_rdml_data(&zipped, 9_999),
            Err(RdmlError::TooLarge { limit: 9_999 })
        );
        assert!(unzip_rdml_data(&zipped, 10_000).is_ok());
    }
}
