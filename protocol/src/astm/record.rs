//! E1394 / LIS2-A2 records (protocols.md §2): a message is records separated by CR,
//! from H (header) to L (terminator). Fields are positional and numbered as in the
//! standard: field 1 is the record type, field 2 the sequence number (in H, the
//! delimiter definition). Text is ISO 8859-1: one byte, one `char`.
//!
//! Parsing never panics. Unknown or unterminated escape sequences are kept literally
//! (analysers do send a bare `&`); sequence numbers (field 2) are not checked.

use super::CR;

/// The four delimiters a header declares (H.1–H.2, canonical `|\^&`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delimiters {
    /// Field delimiter, `|`.
    pub field: u8,
    /// Repeat delimiter, `\`.
    pub repeat: u8,
    /// Component delimiter, `^`.
    pub component: u8,
    /// Escape character, `&`.
    pub escape: u8,
}

impl Default for Delimiters {
    fn default() -> Self {
        Delimiters {
            field: b'|',
            repeat: b'\\',
            component: b'^',
            escape: b'&',
        }
    }
}

impl Delimiters {
    /// Reads the delimiters from a header record's first bytes (`H|\^&…`). They must be
    /// four distinct printable characters, not letters or digits.
    pub fn from_header(record: &[u8]) -> Result<Delimiters, RecordError> {
        let bad = || RecordError::BadDelimiters {
            found: echo_bytes(record.get(1..5).unwrap_or(&record[record.len().min(1)..])),
        };
        if !record
            .first()
            .is_some_and(|b| b.eq_ignore_ascii_case(&b'H'))
        {
            return Err(RecordError::MissingHeader);
        }
        let Some(&[field, repeat, component, escape]) = record.get(1..5) else {
            return Err(bad());
        };
        let set = [field, repeat, component, escape];
        let usable = |b: u8| (0x21..0x7F).contains(&b) && !b.is_ascii_alphanumeric();
        let distinct = set
            .iter()
            .enumerate()
            .all(|(i, a)| set[i + 1..].iter().all(|b| a != b));
        if !set.iter().all(|b| usable(*b)) || !distinct {
            return Err(bad());
        }
        Ok(Delimiters {
            field,
            repeat,
            component,
            escape,
        })
    }
}

/// A record type (field 1; case-insensitive on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RecordType {
    /// H: message header (level 0, first).
    Header,
    /// P: patient (level 1).
    Patient,
    /// O: test order (level 2, under P).
    Order,
    /// R: result, one determination (level 3, under O).
    Result,
    /// C: comment on the preceding record.
    Comment,
    /// Q: host query (level 1).
    Query,
    /// M: manufacturer information.
    Manufacturer,
    /// S: scientific record.
    Scientific,
    /// L: message terminator (level 0, last).
    Terminator,
}

impl RecordType {
    /// The type for a record's first byte.
    pub fn from_byte(byte: u8) -> Option<RecordType> {
        Some(match byte.to_ascii_uppercase() {
            b'H' => RecordType::Header,
            b'P' => RecordType::Patient,
            b'O' => RecordType::Order,
            b'R' => RecordType::Result,
            b'C' => RecordType::Comment,
            b'Q' => RecordType::Query,
            b'M' => RecordType::Manufacturer,
            b'S' => RecordType::Scientific,
            b'L' => RecordType::Terminator,
            _ => return None,
        })
    }

    /// The type's letter, upper case.
    pub fn letter(self) -> char {
        match self {
            RecordType::Header => 'H',
            RecordType::Patient => 'P',
            RecordType::Order => 'O',
            RecordType::Result => 'R',
            RecordType::Comment => 'C',
            RecordType::Query => 'Q',
            RecordType::Manufacturer => 'M',
            RecordType::Scientific => 'S',
            RecordType::Terminator => 'L',
        }
    }
}

/// Why records were refused. Positions are 1-based: record 1 is the header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The message is empty or does not start with an H record: a fragment, or not ASTM.
    #[error("the message does not start with a header (H) record")]
    MissingHeader,
    /// The header's delimiter definition is not four distinct usable characters.
    #[error("the header declares unusable delimiters {found:?} (expected e.g. |\\^&)")]
    BadDelimiters {
        /// The characters after `H`.
        found: String,
    },
    /// A record starts with a letter that is no record type: a damaged record, or a
    /// vendor extension pcrd does not know.
    #[error("record {record}: unknown record type {found:?}")]
    UnknownRecordType {
        /// Position of the record.
        record: usize,
        /// The record's first characters.
        found: String,
    },
    /// A record is out of the H, P, O, R hierarchy (an R without an O, an O without a P,
    /// a second H, a record after L…): a sender fault or a lost record.
    #[error("record {record} ({kind}): {reason}")]
    Hierarchy {
        /// Position of the record.
        record: usize,
        /// Its type letter.
        kind: char,
        /// What rule it breaks.
        reason: &'static str,
    },
    /// The message ends without an L record: the transmission was cut short.
    #[error("the message has no terminator (L) record")]
    MissingTerminator,
    /// A field pcrd needs is missing or empty.
    #[error("record {record} ({kind}): field {field} ({name}) is missing or empty")]
    MissingField {
        /// Position of the record (0 when the record stands alone).
        record: usize,
        /// Its type letter.
        kind: char,
        /// The field number.
        field: usize,
        /// What the field holds.
        name: &'static str,
    },
    /// A value to send holds a character that cannot go on the wire (not ISO 8859-1, or
    /// a control character).
    #[error("field {field} of a {kind} record holds {found:?}, which cannot be sent")]
    Unencodable {
        /// The record's type letter.
        kind: char,
        /// The field number.
        field: usize,
        /// The character.
        found: char,
    },
}

fn echo_bytes(bytes: &[u8]) -> String {
    crate::echo(&latin1(bytes))
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|b| char::from(*b)).collect()
}

/// One field: repeats of components, unescaped. An empty field is one repeat with one
/// empty component.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Field {
    /// The repeats; each holds the components.
    pub repeats: Vec<Vec<String>>,
}

impl Field {
    /// A field of one plain value.
    pub fn text(value: impl Into<String>) -> Field {
        Field {
            repeats: vec![vec![value.into()]],
        }
    }

    /// A field of one repeat with these components.
    pub fn components<S: Into<String>>(parts: impl IntoIterator<Item = S>) -> Field {
        Field {
            repeats: vec![parts.into_iter().map(Into::into).collect()],
        }
    }

    /// Component `c` (1-based) of repeat `r` (1-based); "" when absent.
    pub fn component(&self, r: usize, c: usize) -> &str {
        r.checked_sub(1)
            .and_then(|r| self.repeats.get(r))
            .and_then(|rep| c.checked_sub(1).and_then(|c| rep.get(c)))
            .map_or("", String::as_str)
    }

    /// The first component of the first repeat.
    pub fn value(&self) -> &str {
        self.component(1, 1)
    }

    /// Is every component of every repeat empty?
    pub fn is_empty(&self) -> bool {
        self.repeats.iter().flatten().all(String::is_empty)
    }
}

/// One record: its type and its fields. `fields[0]` is field 1 (the type letter as
/// sent), `fields[1]` field 2, and so on; for H, field 2 holds the delimiter
/// definition literally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record type.
    pub kind: RecordType,
    /// The fields, field 1 first.
    pub fields: Vec<Field>,
}

impl Record {
    /// A record of `kind` with only its type field.
    pub fn new(kind: RecordType) -> Record {
        Record {
            kind,
            fields: vec![Field::text(kind.letter())],
        }
    }

    /// Field `n` (1-based); an empty field when absent (trailing empties may be dropped).
    pub fn field(&self, n: usize) -> &Field {
        static EMPTY: Field = Field {
            repeats: Vec::new(),
        };
        n.checked_sub(1)
            .and_then(|i| self.fields.get(i))
            .unwrap_or(&EMPTY)
    }

    /// Sets field `n` (1-based, ≥ 2), adding empty fields before it as needed.
    pub fn set(&mut self, n: usize, field: Field) -> &mut Record {
        if n >= 2 {
            if self.fields.len() < n {
                self.fields.resize(n, Field::default());
            }
            self.fields[n - 1] = field;
        }
        self
    }

    /// Parses one record (without its CR) with `delims`. Fails only on an unknown
    /// record type; `position` names the record in the error.
    pub fn parse(
        bytes: &[u8],
        delims: &Delimiters,
        position: usize,
    ) -> Result<Record, RecordError> {
        let kind = bytes
            .first()
            .and_then(|b| RecordType::from_byte(*b))
            .ok_or_else(|| RecordError::UnknownRecordType {
                record: position,
                found: echo_bytes(&bytes[..bytes.len().min(8)]),
            })?;
        let mut fields = Vec::new();
        for (i, raw) in bytes.split(|b| *b == delims.field).enumerate() {
            let field = if kind == RecordType::Header && i == 1 {
                // H.2 is the delimiter definition itself: keep it literally.
                Field::text(latin1(raw))
            } else {
                Field {
                    repeats: raw
                        .split(|b| *b == delims.repeat)
                        .map(|rep| {
                            rep.split(|b| *b == delims.component)
                                .map(|c| unescape(c, delims))
                                .collect()
                        })
                        .collect(),
                }
            };
            fields.push(field);
        }
        // Field 1 is the type letter; keep it in the canonical upper case.
        if let Some(first) = fields.first_mut() {
            *first = Field::text(kind.letter());
        }
        Ok(Record { kind, fields })
    }

    /// The record's bytes (without CR), escaping delimiters inside values.
    pub fn encode(&self, delims: &Delimiters) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        let kind = self.kind.letter();
        out.push(kind as u8);
        for (i, field) in self.fields.iter().enumerate().skip(1) {
            out.push(delims.field);
            if self.kind == RecordType::Header && i == 1 {
                out.extend_from_slice(&[delims.repeat, delims.component, delims.escape]);
                continue;
            }
            for (r, rep) in field.repeats.iter().enumerate() {
                if r > 0 {
                    out.push(delims.repeat);
                }
                for (c, comp) in rep.iter().enumerate() {
                    if c > 0 {
                        out.push(delims.component);
                    }
                    escape_into(comp, delims, &mut out).map_err(|found| {
                        RecordError::Unencodable {
                            kind,
                            field: i + 1,
                            found,
                        }
                    })?;
                }
            }
        }
        Ok(out)
    }
}

fn escape_into(value: &str, d: &Delimiters, out: &mut Vec<u8>) -> Result<(), char> {
    for ch in value.chars() {
        let byte = u8::try_from(u32::from(ch)).map_err(|_| ch)?;
        let code = match byte {
            b if b == d.field => Some(b'F'),
            b if b == d.component => Some(b'S'),
            b if b == d.repeat => Some(b'R'),
            b if b == d.escape => Some(b'E'),
            // LIS2-A2 §5.1: 7, 9, 11, 12, 32–126, 128–254 (13 ends a record).
            7 | 9 | 11 | 12 | 32..=126 | 128..=254 => None,
            _ => return Err(ch),
        };
        match code {
            Some(code) => out.extend_from_slice(&[d.escape, code, d.escape]),
            None => out.push(byte),
        }
    }
    Ok(())
}

fn unescape(raw: &[u8], d: &Delimiters) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        if b == d.escape
            && let Some(len) = raw[i + 1..].iter().position(|x| *x == d.escape)
        {
            let body = &raw[i + 1..i + 1 + len];
            let decoded: Option<String> = match body {
                b"F" => Some(char::from(d.field).to_string()),
                b"S" => Some(char::from(d.component).to_string()),
                b"R" => Some(char::from(d.repeat).to_string()),
                b"E" => Some(char::from(d.escape).to_string()),
                b"H" | b"N" => Some(String::new()),
                [b'X', hex @ ..]
                    if !hex.is_empty()
                        && hex.len() % 2 == 0
                        && hex.iter().all(u8::is_ascii_hexdigit) =>
                {
                    hex.chunks(2)
                        .map(|p| {
                            std::str::from_utf8(p)
                                .ok()
                                .and_then(|s| u8::from_str_radix(s, 16).ok())
                                .map(char::from)
                        })
                        .collect()
                }
                _ => None,
            };
            if let Some(decoded) = decoded {
                out.push_str(&decoded);
                i += len + 2;
                continue;
            }
        }
        out.push(char::from(b));
        i += 1;
    }
    out
}

/// One LIS2-A2 message, H to L, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The delimiters of its header.
    pub delimiters: Delimiters,
    /// The records, header first, terminator last.
    pub records: Vec<Record>,
}

impl Message {
    /// Parses a message's text (records separated by CR; a trailing CR, empty records and
    /// a LF after each CR are tolerated) and checks the hierarchy.
    pub fn parse(text: &[u8]) -> Result<Message, RecordError> {
        let mut raw_records = text
            .split(|b| *b == CR)
            .map(|r| r.strip_prefix(b"\n").unwrap_or(r))
            .filter(|r| !r.is_empty());
        let first = raw_records.next().ok_or(RecordError::MissingHeader)?;
        let delimiters = Delimiters::from_header(first)?;
        let mut records = vec![Record::parse(first, &delimiters, 1)?];
        for (i, raw) in raw_records.enumerate() {
            records.push(Record::parse(raw, &delimiters, i + 2)?);
        }
        check_hierarchy(&records)?;
        Ok(Message {
            delimiters,
            records,
        })
    }

    /// The message's text: each record followed by CR.
    pub fn encode(&self) -> Result<Vec<u8>, RecordError> {
        let mut out = Vec::new();
        for record in &self.records {
            out.extend(record.encode(&self.delimiters)?);
            out.push(CR);
        }
        Ok(out)
    }

    /// The header.
    pub fn header(&self) -> Option<Header<'_>> {
        self.records.first().and_then(Header::view)
    }

    /// Every order with the results that follow it (up to the next O, P, Q or L).
    pub fn orders(&self) -> Vec<(Order<'_>, Vec<ResultRecord<'_>>)> {
        let mut out: Vec<(Order<'_>, Vec<ResultRecord<'_>>)> = Vec::new();
        let mut open = false;
        for record in &self.records {
            if let Some(order) = Order::view(record) {
                out.push((order, Vec::new()));
                open = true;
            } else if let Some(result) = ResultRecord::view(record) {
                if let (true, Some(last)) = (open, out.last_mut()) {
                    last.1.push(result);
                }
            } else if !matches!(
                record.kind,
                RecordType::Comment | RecordType::Manufacturer | RecordType::Scientific
            ) {
                open = false;
            }
        }
        out
    }

    /// The queries (Q records).
    pub fn queries(&self) -> Vec<Query<'_>> {
        self.records.iter().filter_map(Query::view).collect()
    }

    /// The terminator's code (L.3): "N" or "" normal, "T"/"R" sender/receiver abort, "E"
    /// error, "I" no information for the query.
    pub fn termination_code(&self) -> &str {
        self.records
            .last()
            .filter(|r| r.kind == RecordType::Terminator)
            .map_or("", |r| r.field(3).value())
    }
}

fn check_hierarchy(records: &[Record]) -> Result<(), RecordError> {
    let mut has_patient = false;
    let mut has_order = false;
    let mut has_query = false;
    let mut ended = false;
    for (i, record) in records.iter().enumerate() {
        let err = |reason| RecordError::Hierarchy {
            record: i + 1,
            kind: record.kind.letter(),
            reason,
        };
        if ended {
            return Err(err("record after the terminator (L)"));
        }
        match record.kind {
            RecordType::Header if i > 0 => return Err(err("second header in one message")),
            RecordType::Header => {}
            RecordType::Patient if has_query => {
                return Err(err("patient record in a query message"));
            }
            RecordType::Patient => {
                has_patient = true;
                has_order = false;
            }
            RecordType::Order if !has_patient => {
                return Err(err("order (O) without a patient (P) record before it"));
            }
            RecordType::Order => has_order = true,
            RecordType::Result if !has_order => {
                return Err(err("result (R) without an order (O) record before it"));
            }
            RecordType::Query if has_patient => {
                return Err(err("query record in a message with patients"));
            }
            RecordType::Query => has_query = true,
            RecordType::Terminator => ended = true,
            RecordType::Result
            | RecordType::Comment
            | RecordType::Manufacturer
            | RecordType::Scientific => {}
        }
    }
    if ended {
        Ok(())
    } else {
        Err(RecordError::MissingTerminator)
    }
}

/// The universal test ID (O.5, R.3): `universal-id^name^id-type^manufacturer-code`,
/// then vendor components (for PCR: analyte, value kind; protocols.md §2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TestId {
    /// Component 4, the manufacturer's test code (e.g. `SARS2`).
    pub code: String,
    /// Components 5 and later (e.g. `["E", "Ct"]`); empty for the assay call.
    pub extra: Vec<String>,
    /// Components 1–3 (universal id, name, id type), usually empty.
    pub universal: [String; 3],
}

impl TestId {
    /// A test id with this manufacturer code and vendor components.
    pub fn new(code: impl Into<String>, extra: &[&str]) -> TestId {
        TestId {
            code: code.into(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            universal: Default::default(),
        }
    }

    fn from_components(parts: &[String]) -> TestId {
        let get = |i: usize| parts.get(i).cloned().unwrap_or_default();
        TestId {
            code: get(3),
            extra: parts.get(4..).map(<[String]>::to_vec).unwrap_or_default(),
            universal: [get(0), get(1), get(2)],
        }
    }

    fn components(&self) -> Vec<String> {
        let mut out = self.universal.to_vec();
        out.push(self.code.clone());
        out.extend(self.extra.iter().cloned());
        out
    }
}

/// The header's fields pcrd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a>(&'a Record);

impl<'a> Header<'a> {
    /// The view, if `record` is an H record.
    pub fn view(record: &'a Record) -> Option<Header<'a>> {
        (record.kind == RecordType::Header).then_some(Header(record))
    }
    /// H.3 message control ID.
    pub fn control_id(&self) -> &'a str {
        self.0.field(3).value()
    }
    /// H.5 sender: name (component 1) and the rest (version, serial…).
    pub fn sender(&self) -> &'a Field {
        self.0.field(5)
    }
    /// H.12 processing ID (P production, T training, D debugging, Q QC).
    pub fn processing_id(&self) -> &'a str {
        self.0.field(12).value()
    }
    /// H.13 version (e.g. `LIS2-A2`).
    pub fn version(&self) -> &'a str {
        self.0.field(13).value()
    }
    /// H.14 message time as sent (`YYYYMMDD[HHMMSS]`, sender's local time).
    pub fn timestamp(&self) -> &'a str {
        self.0.field(14).value()
    }
}

/// An order's fields pcrd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order<'a>(&'a Record);

impl<'a> Order<'a> {
    /// The view, if `record` is an O record.
    pub fn view(record: &'a Record) -> Option<Order<'a>> {
        (record.kind == RecordType::Order).then_some(Order(record))
    }
    /// O.3 specimen ID (the tube barcode), first component.
    pub fn specimen_id(&self) -> &'a str {
        self.0.field(3).value()
    }
    /// O.4 instrument specimen ID (rack, position…).
    pub fn instrument_specimen_id(&self) -> &'a Field {
        self.0.field(4)
    }
    /// O.5 universal test IDs, one per repeat.
    pub fn tests(&self) -> Vec<TestId> {
        self.0
            .field(5)
            .repeats
            .iter()
            .map(|r| TestId::from_components(r))
            .collect()
    }
    /// O.6 priority (S stat, A asap, R routine, C callback, P preoperative).
    pub fn priority(&self) -> &'a str {
        self.0.field(6).value()
    }
    /// O.8 collection time as sent.
    pub fn collected(&self) -> &'a str {
        self.0.field(8).value()
    }
    /// O.12 action code (C cancel, A add, N new, P pending, X in process, Q QC).
    pub fn action_code(&self) -> &'a str {
        self.0.field(12).value()
    }
    /// O.16 specimen descriptor.
    pub fn specimen_descriptor(&self) -> &'a str {
        self.0.field(16).value()
    }
    /// O.26 report type (O order, F final, Q query response, X cannot be done…).
    pub fn report_type(&self) -> &'a str {
        self.0.field(26).value()
    }
}

/// A result's fields pcrd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultRecord<'a>(&'a Record);

impl<'a> ResultRecord<'a> {
    /// The view, if `record` is an R record.
    pub fn view(record: &'a Record) -> Option<ResultRecord<'a>> {
        (record.kind == RecordType::Result).then_some(ResultRecord(record))
    }
    /// R.3 universal test ID (the first repeat).
    pub fn test(&self) -> TestId {
        TestId::from_components(
            self.0
                .field(3)
                .repeats
                .first()
                .map_or(&[][..], Vec::as_slice),
        )
    }
    /// R.4 the value as sent: a Ct, a call, or empty. Components beyond the first are
    /// in [`Record::field`]`(4)`.
    pub fn value(&self) -> &'a str {
        self.0.field(4).value()
    }
    /// R.5 units.
    pub fn units(&self) -> &'a str {
        self.0.field(5).value()
    }
    /// R.6 reference range.
    pub fn reference_range(&self) -> &'a str {
        self.0.field(6).value()
    }
    /// R.7 abnormal flags, one per repeat (L, H, N, A, `<`, `>`…), empty ones dropped.
    pub fn flags(&self) -> Vec<&'a str> {
        self.0
            .field(7)
            .repeats
            .iter()
            .filter_map(|r| r.first().map(String::as_str))
            .filter(|s| !s.is_empty())
            .collect()
    }
    /// R.9 status (F final, P preliminary, C correction, X cannot be done…).
    pub fn status(&self) -> &'a str {
        self.0.field(9).value()
    }
    /// R.11 operator (component 1) and verifier (component 2).
    pub fn operator(&self) -> &'a Field {
        self.0.field(11)
    }
    /// R.12 test started, as sent.
    pub fn started(&self) -> &'a str {
        self.0.field(12).value()
    }
    /// R.13 test completed, as sent.
    pub fn completed(&self) -> &'a str {
        self.0.field(13).value()
    }
    /// R.14 instrument identification.
    pub fn instrument(&self) -> &'a str {
        self.0.field(14).value()
    }
}

/// A comment's fields pcrd reads (it belongs to the record before it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comment<'a>(&'a Record);

impl<'a> Comment<'a> {
    /// The view, if `record` is a C record.
    pub fn view(record: &'a Record) -> Option<Comment<'a>> {
        (record.kind == RecordType::Comment).then_some(Comment(record))
    }
    /// C.3 source (P practice, L laboratory system, I instrument).
    pub fn source(&self) -> &'a str {
        self.0.field(3).value()
    }
    /// C.4 comment code (component 1).
    pub fn code(&self) -> &'a str {
        self.0.field(4).component(1, 1)
    }
    /// C.4 comment text: component 2, and any further components (vendors split free
    /// text over them) joined with spaces.
    pub fn text(&self) -> String {
        self.0
            .field(4)
            .repeats
            .first()
            .and_then(|r| r.get(1..))
            .map(|parts| parts.join(" "))
            .unwrap_or_default()
    }
    /// C.5 comment type (G generic, T test name, P positive, N negative, I instrument
    /// flag).
    pub fn kind(&self) -> &'a str {
        self.0.field(5).value()
    }
}

/// A host query's fields pcrd reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a>(&'a Record);

impl<'a> Query<'a> {
    /// The view, if `record` is a Q record.
    pub fn view(record: &'a Record) -> Option<Query<'a>> {
        (record.kind == RecordType::Query).then_some(Query(record))
    }
    /// Q.3 starting range: the specimen IDs asked for (component 2 of each repeat, or
    /// component 1 when the sender put it there), empty ones dropped.
    pub fn specimen_ids(&self) -> Vec<&'a str> {
        self.0
            .field(3)
            .repeats
            .iter()
            .filter_map(|r| {
                r.get(1)
                    .filter(|s| !s.is_empty())
                    .or_else(|| r.first().filter(|s| !s.is_empty()))
                    .map(String::as_str)
            })
            .collect()
    }
    /// Q.5 tests asked for (`ALL` comes as a test id with code "ALL").
    pub fn tests(&self) -> Vec<TestId> {
        self.0
            .field(5)
            .repeats
            .iter()
            .map(|r| TestId::from_components(r))
            .collect()
    }
    /// Q.13 request information status code (`O` for orders).
    pub fn status_code(&self) -> &'a str {
        self.0.field(13).value()
    }
}

/// What pcrd puts in a header it sends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderSpec {
    /// H.5 sender name (e.g. `pcrd`).
    pub sender: String,
    /// H.10 receiver name; may be empty.
    pub receiver: String,
    /// H.12 processing ID; empty means `P`.
    pub processing_id: String,
    /// H.14 message time, `YYYYMMDDHHMMSS`, supplied by the caller (no clock here).
    pub timestamp: String,
}

/// One order pcrd sends (a worklist entry or a query answer).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OrderSpec {
    /// O.3 specimen ID (tube barcode).
    pub specimen_id: String,
    /// O.5 tests ordered.
    pub tests: Vec<TestId>,
    /// O.6 priority; empty means `R` (routine).
    pub priority: String,
    /// O.12 action code; empty means `N` (new).
    pub action_code: String,
    /// O.26 report type; empty means `O` (order) — `Q` for a query answer.
    pub report_type: String,
}

fn or_default(value: &str, default: &str) -> String {
    if value.is_empty() { default } else { value }.to_owned()
}

impl Message {
    /// A message of orders: H, then per order an anonymous P and its O, then L.
    /// With no orders, the terminator says `I` (no information: the answer to a query
    /// for unknown specimens).
    pub fn orders_message(header: &HeaderSpec, orders: &[OrderSpec]) -> Message {
        let mut h = Record::new(RecordType::Header);
        h.set(2, Field::text("\\^&"))
            .set(5, Field::text(header.sender.clone()))
            .set(10, Field::text(header.receiver.clone()))
            .set(12, Field::text(or_default(&header.processing_id, "P")))
            .set(13, Field::text("LIS2-A2"))
            .set(14, Field::text(header.timestamp.clone()));
        let mut records = vec![h];
        for (i, order) in orders.iter().enumerate() {
            let mut p = Record::new(RecordType::Patient);
            p.set(2, Field::text((i + 1).to_string()));
            let mut o = Record::new(RecordType::Order);
            o.set(2, Field::text("1"))
                .set(3, Field::text(order.specimen_id.clone()))
                .set(
                    5,
                    Field {
                        repeats: order.tests.iter().map(TestId::components).collect(),
                    },
                )
                .set(6, Field::text(or_default(&order.priority, "R")))
                .set(12, Field::text(or_default(&order.action_code, "N")))
                .set(26, Field::text(or_default(&order.report_type, "O")));
            records.extend([p, o]);
        }
        let mut l = Record::new(RecordType::Terminator);
        l.set(2, Field::text("1"))
            .set(3, Field::text(if orders.is_empty() { "I" } else { "N" }));
        records.push(l);
        Message {
            delimiters: Delimiters::default(),
            records,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &[u8] = b"H|\\^&|||AN01|||||||P|LIS2-A2|20240115103012\r\
P|1||PAT0001\r\
O|1|SPC0042||^^^SARS2|R||||||||||||||||||||F\r\
R|1|^^^SARS2|POS|||A||F\r\
R|2|^^^SARS2^E^Ct|24.61|||||F\r\
R|3|^^^SARS2^E^EndPt|412|||||F\r\
R|4|^^^SARS2^N2^Ct|26.02|||||F\r\
R|5|^^^SARS2^SPC^Ct|28.40|||||F\r\
L|1|N\r";

    #[test]
    fn the_worked_example_reads_into_typed_views() {
        let m = Message::parse(EXAMPLE).unwrap();
        let h = m.header().unwrap();
        assert_eq!(h.sender().value(), "AN01");
        assert_eq!(h.version(), "LIS2-A2");
        assert_eq!(h.timestamp(), "20240115103012");
        let orders = m.orders();
        assert_eq!(orders.len(), 1);
        let (o, results) = &orders[0];
        assert_eq!(o.specimen_id(), "SPC0042");
        assert_eq!(o.tests()[0].code, "SARS2");
        assert_eq!(o.report_type(), "F");
        assert_eq!(results.len(), 5);
        assert_eq!(results[0].value(), "POS");
        assert_eq!(results[0].flags(), ["A"]);
        assert_eq!(results[1].test().extra, ["E", "Ct"]);
        assert_eq!(results[1].value(), "24.61");
        assert_eq!(results[4].test().extra, ["SPC", "Ct"]);
        assert!(results.iter().all(|r| r.status() == "F"));
        assert_eq!(m.termination_code(), "N");
        assert_eq!(m.encode().unwrap(), EXAMPLE);
    }

    #[test]
    fn other_delimiters_and_escapes_are_read_from_the_header() {
        let text =
            b"H!~#$\rP!1\rO!1!A$F$B$S$C!!###CoV~###Flu\rR!1!###CoV!a$E$b$X4142$$H$x$Z12$!u\rC!1!I!X1#Cartridge$S$lot 7#more!G\rl!1\r";
        let m = Message::parse(text).unwrap();
        assert_eq!(m.delimiters.field, b'!');
        let c = Comment::view(&m.records[4]).unwrap();
        assert_eq!(
            (c.source(), c.code(), c.text().as_str(), c.kind()),
            ("I", "X1", "Cartridge#lot 7 more", "G")
        );
        let (o, results) = &m.orders()[0];
        assert_eq!(o.specimen_id(), "A!B#C");
        let codes: Vec<String> = o.tests().into_iter().map(|t| t.code).collect();
        assert_eq!(codes, ["CoV", "Flu"]);
        assert_eq!(results[0].value(), "a$bABx$Z12$");
        assert_eq!(m.encode().map(|b| Message::parse(&b).unwrap()).unwrap(), m);
    }

    #[test]
    fn hierarchy_errors_name_the_record() {
        let cases: [(&[u8], &str); 6] = [
            (b"H|\\^&\rR|1\rL|1\r", "record 2 (R)"),
            (b"H|\\^&\rO|1\rL|1\r", "record 2 (O)"),
            (b"H|\\^&\rP|1\rL|1\rP|2\r", "record 4 (P): record after"),
            (b"H|\\^&\rP|1\rH|\\^&\rL\r", "second header"),
            (b"H|\\^&\rP|1\r", "no terminator"),
            (b"H|\\^&\rX|1\rL\r", "record 2: unknown record type"),
        ];
        for (text, needle) in cases {
            let err = Message::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        assert_eq!(Message::parse(b"P|1\r"), Err(RecordError::MissingHeader));
        assert!(matches!(
            Message::parse(b"H||||\rL\r"),
            Err(RecordError::BadDelimiters { .. })
        ));
    }

    #[test]
    fn queries_and_orders_are_built_and_read_back() {
        let q =
            Message::parse(b"H|\\^&\rQ|1|^SPC0042\\^SPC0043||^^^ALL||||||||O\rL|1|N\r").unwrap();
        let query = q.queries()[0];
        assert_eq!(query.specimen_ids(), ["SPC0042", "SPC0043"]);
        assert_eq!(query.tests()[0].code, "ALL");
        assert_eq!(query.status_code(), "O");
        let header = HeaderSpec {
            sender: "pcrd".into(),
            timestamp: "20240115103012".into(),
            ..HeaderSpec::default()
        };
        let order = OrderSpec {
            specimen_id: "SPC^42".into(),
            tests: vec![TestId::new("SARS2", &[])],
            report_type: "Q".into(),
            ..OrderSpec::default()
        };
        let m = Message::orders_message(&header, &[order]);
        let text = m.encode().unwrap();
        assert_eq!(
            text,
            b"H|\\^&|||pcrd|||||||P|LIS2-A2|20240115103012\rP|1\rO|1|SPC&S&42||^^^SARS2|R||||||N||||||||||||||Q\rL|1|N\r"
        );
        let back = Message::parse(&text).unwrap();
        assert_eq!(back.orders()[0].0.specimen_id(), "SPC^42");
        let none = Message::orders_message(&header, &[]);
        assert_eq!(none.termination_code(), "I");
        let mut bad = Record::new(RecordType::Comment);
        bad.set(4, Field::text("line\nbreak"));
        assert!(matches!(
            bad.encode(&Delimiters::default()),
            Err(RecordError::Unencodable { field: 4, .. })
        ));
    }
}
