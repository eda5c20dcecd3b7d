//! `rdml_data.xml` → [`Document`]: a recursive-descent reader over quick-xml's event
//! stream. It never builds a tree, so memory follows the model (a few numbers per
//! amplification point), not the size of the XML.
//!
//! Elements are matched by local name in the RDML namespace. Real files mix the default
//! namespace with the `rdml:` prefix bound to the same URI (`<sample>` next to
//! `<rdml:sample>`), and some writers leave the namespace out; elements of any other
//! namespace are extensions and are skipped, as are RDML elements the model does not
//! keep. Skipped content must still be well-formed XML.

use std::borrow::Cow;

use quick_xml::NsReader;
use quick_xml::XmlVersion;
use quick_xml::escape::resolve_predefined_entity;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};

use super::{
    Document, Dye, Experiment, LABELS, NAMESPACE, PcrFormat, Quantity, RdmlError, Reaction,
    ReactionData, Run, SUPPORTED_VERSIONS, Sample, Target,
};
use crate::echo;

/// The dye id rdmlpython gives an RDML 1.0 target that names no dye (1.0 made `dyeId`
/// optional; 1.1 requires it). Used for the same reason: the model needs one.
const MISSING_DYE_1_0: &str = "conversion_dye_missing";

/// Parses the XML text of an RDML file.
pub(super) fn parse(bytes: &[u8]) -> Result<Document, RdmlError> {
    let input = std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        RdmlError::NotUtf8 {
            line: 1 + count_newlines(&bytes[..at]),
            byte: at as u64,
        }
    })?;
    Parser::new(input).document()
}

fn count_newlines(bytes: &[u8]) -> u64 {
    bytes.iter().filter(|&&b| b == b'\n').count() as u64
}

/// The RDML elements the model reads, by local name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Rdml,
    Dye,
    Sample,
    Type,
    Quantity,
    Value,
    Unit,
    Target,
    DyeId,
    Experiment,
    Run,
    Instrument,
    CqDetectionMethod,
    PcrFormat,
    Rows,
    Columns,
    RowLabel,
    ColumnLabel,
    React,
    Data,
    Tar,
    Cq,
    Excl,
    Adp,
    Cyc,
    Fluor,
    BgFluor,
    BgFluorSlp,
    QuantFluor,
    /// An RDML element the model does not keep.
    Other,
    /// An element of another namespace.
    Foreign,
}

impl Tag {
    fn from_local_name(name: &str) -> Tag {
        match name {
            "rdml" => Tag::Rdml,
            "dye" => Tag::Dye,
            "sample" => Tag::Sample,
            "type" => Tag::Type,
            "quantity" => Tag::Quantity,
            "value" => Tag::Value,
            "unit" => Tag::Unit,
            "target" => Tag::Target,
            "dyeId" => Tag::DyeId,
            "experiment" => Tag::Experiment,
            "run" => Tag::Run,
            "instrument" => Tag::Instrument,
            "cqDetectionMethod" => Tag::CqDetectionMethod,
            "pcrFormat" => Tag::PcrFormat,
            "rows" => Tag::Rows,
            "columns" => Tag::Columns,
            "rowLabel" => Tag::RowLabel,
            "columnLabel" => Tag::ColumnLabel,
            "react" => Tag::React,
            "data" => Tag::Data,
            "tar" => Tag::Tar,
            "cq" => Tag::Cq,
            "excl" => Tag::Excl,
            "adp" => Tag::Adp,
            "cyc" => Tag::Cyc,
            "fluor" => Tag::Fluor,
            "bgFluor" => Tag::BgFluor,
            "bgFluorSlp" => Tag::BgFluorSlp,
            "quantFluor" => Tag::QuantFluor,
            _ => Tag::Other,
        }
    }

    /// The element name, for messages.
    fn name(self) -> &'static str {
        match self {
            Tag::Rdml => "rdml",
            Tag::Dye => "dye",
            Tag::Sample => "sample",
            Tag::Type => "type",
            Tag::Quantity => "quantity",
            Tag::Value => "value",
            Tag::Unit => "unit",
            Tag::Target => "target",
            Tag::DyeId => "dyeId",
            Tag::Experiment => "experiment",
            Tag::Run => "run",
            Tag::Instrument => "instrument",
            Tag::CqDetectionMethod => "cqDetectionMethod",
            Tag::PcrFormat => "pcrFormat",
            Tag::Rows => "rows",
            Tag::Columns => "columns",
            Tag::RowLabel => "rowLabel",
            Tag::ColumnLabel => "columnLabel",
            Tag::React => "react",
            Tag::Data => "data",
            Tag::Tar => "tar",
            Tag::Cq => "cq",
            Tag::Excl => "excl",
            Tag::Adp => "adp",
            Tag::Cyc => "cyc",
            Tag::Fluor => "fluor",
            Tag::BgFluor => "bgFluor",
            Tag::BgFluorSlp => "bgFluorSlp",
            Tag::QuantFluor => "quantFluor",
            Tag::Other => "(an RDML element)",
            Tag::Foreign => "(an element of another namespace)",
        }
    }
}

/// One step of the event stream, as the parser needs it.
enum Node<'i> {
    /// A start tag (empty elements are expanded into start and end).
    Start(Tag, BytesStart<'i>),
    /// An end tag; quick-xml has checked that it matches its start tag.
    End,
    /// Character data: text, CDATA or a resolved reference.
    Text(Cow<'i, str>),
    /// The end of the input.
    Eof,
}

/// Where the namespace of an element points.
enum Space {
    Rdml,
    Foreign,
    Undeclared(String),
}

struct Parser<'i> {
    reader: NsReader<&'i [u8]>,
    input: &'i str,
    /// The version attribute of the root, once read.
    version: String,
    /// A known (byte offset, line) pair, so that line numbers cost one pass overall.
    line_mark: (usize, u64),
}

/// A reaction as read, before its id is checked against the plate format.
struct RawReaction {
    id: String,
    line: u64,
    reaction: Reaction,
}

impl<'i> Parser<'i> {
    fn new(input: &'i str) -> Self {
        let mut reader = NsReader::from_str(input);
        let config = reader.config_mut();
        config.expand_empty_elements = true;
        config.check_end_names = true;
        config.trim_text(false);
        Parser {
            reader,
            input,
            version: String::new(),
            line_mark: (0, 1),
        }
    }

    /// The line (from 1) of a byte offset.
    fn line_at(&mut self, pos: u64) -> u64 {
        let pos = usize::try_from(pos)
            .unwrap_or(usize::MAX)
            .min(self.input.len());
        let (mark, line) = if pos >= self.line_mark.0 {
            self.line_mark
        } else {
            (0, 1)
        };
        let line = line + count_newlines(&self.input.as_bytes()[mark..pos]);
        self.line_mark = (pos, line);
        line
    }

    /// The line the reader has reached.
    fn line(&mut self) -> u64 {
        let pos = self.reader.buffer_position();
        self.line_at(pos)
    }

    fn xml_error(&mut self, pos: u64, reason: impl std::fmt::Display) -> RdmlError {
        RdmlError::Xml {
            line: self.line_at(pos),
            byte: pos,
            reason: reason.to_string(),
        }
    }

    fn error_from_quick_xml(&mut self, e: quick_xml::Error) -> RdmlError {
        let pos = self.reader.error_position();
        self.xml_error(pos, e)
    }

    fn next(&mut self) -> Result<Node<'i>, RdmlError> {
        loop {
            let (space, event) = match self.reader.read_resolved_event() {
                Ok((resolved, event)) => {
                    let space = match resolved {
                        ResolveResult::Bound(Namespace(ns)) if ns == NAMESPACE => Space::Rdml,
                        // No namespace at all: a writer that left xmlns out. Read it.
                        ResolveResult::Unbound => Space::Rdml,
                        ResolveResult::Bound(_) => Space::Foreign,
                        ResolveResult::Unknown(prefix) => Space::Undeclared(prefix.to_string()),
                    };
                    (space, event)
                }
                Err(e) => return Err(self.error_from_quick_xml(e)),
            };
            return Ok(match event {
                Event::Start(start) => {
                    let tag = match space {
                        Space::Rdml => Tag::from_local_name(start.local_name().as_ref()),
                        Space::Foreign => Tag::Foreign,
                        Space::Undeclared(prefix) => {
                            let pos = self.reader.buffer_position();
                            return Err(self.xml_error(
                                pos,
                                format!("namespace prefix {:?} is not declared", echo(&prefix)),
                            ));
                        }
                    };
                    Node::Start(tag, start)
                }
                Event::End(_) => Node::End,
                Event::Text(text) => Node::Text(text.xml10_content()),
                Event::CData(data) => Node::Text(data.xml10_content()),
                Event::GeneralRef(reference) => {
                    let pos = self.reader.buffer_position();
                    match reference.resolve_char_ref() {
                        Ok(Some(c)) => Node::Text(Cow::Owned(c.to_string())),
                        Ok(None) => match resolve_predefined_entity(&reference) {
                            Some(text) => Node::Text(Cow::Borrowed(text)),
                            None => {
                                return Err(self.xml_error(
                                    pos,
                                    format!("unknown entity &{};", echo(&reference)),
                                ));
                            }
                        },
                        Err(e) => return Err(self.xml_error(pos, e)),
                    }
                }
                Event::Eof => Node::Eof,
                // Expanded into Start and End by the configuration; never seen.
                Event::Empty(_) => {
                    let pos = self.reader.buffer_position();
                    return Err(self.xml_error(pos, "unexpected empty element"));
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {
                    continue;
                }
            });
        }
    }

    fn truncated(&mut self, inside: Tag) -> RdmlError {
        let pos = self.input.len() as u64;
        let reason = match inside {
            Tag::Other | Tag::Foreign => "the XML ends inside an element".to_owned(),
            tag => format!("the XML ends inside <{}>", tag.name()),
        };
        self.xml_error(pos, reason)
    }

    fn unexpected(&mut self, place: &str, what: String) -> RdmlError {
        RdmlError::Unexpected {
            line: self.line(),
            place: place.to_owned(),
            what,
        }
    }

    /// Calls `f` for each child element of the element just started, up to and
    /// including its end tag. `f` must consume the child to its end tag. Text between
    /// children must be white space.
    fn children(
        &mut self,
        tag: Tag,
        place: &str,
        mut f: impl FnMut(&mut Self, Tag, BytesStart<'i>) -> Result<(), RdmlError>,
    ) -> Result<(), RdmlError> {
        loop {
            match self.next()? {
                Node::Start(child, start) => f(self, child, start)?,
                Node::End => return Ok(()),
                Node::Text(text) => {
                    let text = text.trim();
                    if !text.is_empty() {
                        let what = format!("text {:?} in <{}>", echo(text), tag.name());
                        return Err(self.unexpected(place, what));
                    }
                }
                Node::Eof => return Err(self.truncated(tag)),
            }
        }
    }

    /// Skips the element just started, which must still be well-formed.
    fn skip(&mut self, tag: Tag) -> Result<(), RdmlError> {
        let mut depth = 1usize;
        loop {
            match self.next()? {
                Node::Start(..) => depth += 1,
                Node::End => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                Node::Text(_) => {}
                Node::Eof => return Err(self.truncated(tag)),
            }
        }
    }

    /// The text of the element just started, which must have no child elements.
    fn text(&mut self, tag: Tag, place: &str) -> Result<String, RdmlError> {
        let mut out = String::new();
        loop {
            match self.next()? {
                Node::Text(text) => out.push_str(&text),
                Node::End => return Ok(out),
                Node::Start(_, start) => {
                    let name = start.name().as_ref().to_owned();
                    let what = format!("element <{}> in <{}>", echo(&name), tag.name());
                    return Err(self.unexpected(place, what));
                }
                Node::Eof => return Err(self.truncated(tag)),
            }
        }
    }

    /// The text of the element just started, white space around it removed.
    fn token(&mut self, tag: Tag, place: &str) -> Result<String, RdmlError> {
        Ok(self.text(tag, place)?.trim().to_owned())
    }

    /// The element just started as a finite number (xs:float, read as f64).
    fn number(&mut self, tag: Tag, place: &str) -> Result<f64, RdmlError> {
        let line = self.line();
        let text = self.text(tag, place)?;
        parse_finite(&text).ok_or_else(|| RdmlError::NotANumber {
            line,
            place: place.to_owned(),
            element: tag.name().to_owned(),
            text: echo(text.trim()),
        })
    }

    /// An attribute's value (unprefixed name), references resolved.
    fn attribute(
        &mut self,
        start: &BytesStart<'_>,
        name: &str,
    ) -> Result<Option<String>, RdmlError> {
        for attribute in start.attributes() {
            let attribute = match attribute {
                Ok(a) => a,
                Err(e) => {
                    let pos = self.reader.buffer_position();
                    return Err(self.xml_error(pos, e));
                }
            };
            if attribute.key.as_ref() == name {
                return match attribute.normalized_value(XmlVersion::Implicit1_0) {
                    Ok(value) => Ok(Some(value.into_owned())),
                    Err(e) => {
                        let pos = self.reader.buffer_position();
                        Err(self.xml_error(pos, e))
                    }
                };
            }
        }
        Ok(None)
    }

    /// A required, non-empty `id` attribute.
    fn id(&mut self, start: &BytesStart<'_>, tag: Tag, place: &str) -> Result<String, RdmlError> {
        match self.attribute(start, "id")? {
            Some(id) if !id.is_empty() => Ok(id),
            _ => Err(RdmlError::Missing {
                line: self.line(),
                place: place.to_owned(),
                what: format!("the id of <{}>", tag.name()),
            }),
        }
    }

    fn repeated(&mut self, tag: Tag, place: &str) -> RdmlError {
        RdmlError::Repeated {
            line: self.line(),
            place: place.to_owned(),
            element: tag.name().to_owned(),
        }
    }

    fn missing(&mut self, place: &str, what: &str) -> RdmlError {
        RdmlError::Missing {
            line: self.line(),
            place: place.to_owned(),
            what: what.to_owned(),
        }
    }

    /// Stores `value` in an element that may appear once.
    fn once<T>(
        &mut self,
        slot: &mut Option<T>,
        value: T,
        tag: Tag,
        place: &str,
    ) -> Result<(), RdmlError> {
        if slot.is_some() {
            return Err(self.repeated(tag, place));
        }
        *slot = Some(value);
        Ok(())
    }

    fn document(mut self) -> Result<Document, RdmlError> {
        let root = loop {
            match self.next()? {
                Node::Start(tag, start) => break (tag, start),
                Node::Text(text) if text.trim().is_empty() => {}
                Node::Text(_) => {
                    let pos = self.reader.buffer_position();
                    return Err(self.xml_error(pos, "text before the root element"));
                }
                Node::End | Node::Eof => {
                    let pos = self.reader.buffer_position();
                    return Err(self.xml_error(pos, "no root element"));
                }
            }
        };
        let (tag, start) = root;
        if tag != Tag::Rdml {
            return Err(RdmlError::NotRdml {
                line: self.line(),
                found: echo(start.name().as_ref()),
            });
        }
        let version = self.attribute(&start, "version")?.unwrap_or_default();
        if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
            return Err(RdmlError::UnsupportedVersion {
                version: echo(&version),
            });
        }
        self.version = version.clone();
        let mut doc = Document {
            version,
            dyes: Vec::new(),
            samples: Vec::new(),
            targets: Vec::new(),
            experiments: Vec::new(),
        };
        self.children(Tag::Rdml, "the document", |p, tag, start| match tag {
            Tag::Dye => {
                let id = p.id(&start, tag, "the document")?;
                doc.dyes.push(Dye { id });
                p.skip(tag)
            }
            Tag::Sample => {
                doc.samples.push(p.sample(&start)?);
                Ok(())
            }
            Tag::Target => {
                doc.targets.push(p.target(&start)?);
                Ok(())
            }
            Tag::Experiment => {
                doc.experiments.push(p.experiment(&start)?);
                Ok(())
            }
            _ => p.skip(tag),
        })?;
        loop {
            match self.next()? {
                Node::Eof => break,
                Node::Text(text) if text.trim().is_empty() => {}
                Node::Start(..) | Node::Text(_) | Node::End => {
                    let pos = self.reader.buffer_position();
                    return Err(self.xml_error(pos, "content after the root element"));
                }
            }
        }
        if doc.version == "1.0" {
            // RDML 1.0 has no <dye>: a target's dyeId is free text. Declare each one, as
            // rdmlpython's migration to 1.1 does.
            for target in &doc.targets {
                if doc.dye(&target.dye_id).is_none() {
                    doc.dyes.push(Dye {
                        id: target.dye_id.clone(),
                    });
                }
            }
        }
        Ok(doc)
    }

    fn sample(&mut self, start: &BytesStart<'_>) -> Result<Sample, RdmlError> {
        let id = self.id(start, Tag::Sample, "the document")?;
        let place = format!("sample {:?}", echo(&id));
        // Types and quantities may be given per target (RDML 1.2+, attribute targetId);
        // the one for all targets wins, else the first.
        let mut kind: Option<(bool, String)> = None;
        let mut quantity: Option<(bool, Quantity)> = None;
        self.children(Tag::Sample, &place, |p, tag, start| match tag {
            Tag::Type => {
                let general = p.attribute(&start, "targetId")?.is_none();
                let value = p.token(tag, &place)?;
                if kind.as_ref().is_none_or(|(g, _)| general && !g) {
                    kind = Some((general, value));
                }
                Ok(())
            }
            Tag::Quantity => {
                let general = p.attribute(&start, "targetId")?.is_none();
                let value = p.quantity(&place)?;
                if quantity.as_ref().is_none_or(|(g, _)| general && !g) {
                    quantity = Some((general, value));
                }
                Ok(())
            }
            _ => p.skip(tag),
        })?;
        Ok(Sample {
            id,
            kind: kind.map_or_else(|| "unkn".to_owned(), |(_, k)| k),
            quantity: quantity.map(|(_, q)| q),
        })
    }

    fn quantity(&mut self, place: &str) -> Result<Quantity, RdmlError> {
        let mut value = None;
        let mut unit = None;
        self.children(Tag::Quantity, place, |p, tag, _| match tag {
            Tag::Value => {
                let v = p.number(tag, place)?;
                p.once(&mut value, v, tag, place)
            }
            Tag::Unit => {
                let u = p.token(tag, place)?;
                p.once(&mut unit, u, tag, place)
            }
            _ => p.skip(tag),
        })?;
        match (value, unit) {
            (Some(value), Some(unit)) => Ok(Quantity { value, unit }),
            (None, _) => Err(self.missing(place, "<value> of <quantity>")),
            (_, None) => Err(self.missing(place, "<unit> of <quantity>")),
        }
    }

    fn target(&mut self, start: &BytesStart<'_>) -> Result<Target, RdmlError> {
        let id = self.id(start, Tag::Target, "the document")?;
        let place = format!("target {:?}", echo(&id));
        let mut kind = None;
        let mut dye_id = None;
        self.children(Tag::Target, &place, |p, tag, start| match tag {
            Tag::Type => {
                let k = p.token(tag, &place)?;
                p.once(&mut kind, k, tag, &place)
            }
            Tag::DyeId => {
                // 1.1+: <dyeId id="..."/>; 1.0: <dyeId>text</dyeId>.
                let dye = match p.attribute(&start, "id")? {
                    Some(id) => {
                        p.skip(tag)?;
                        id
                    }
                    None => p.token(tag, &place)?,
                };
                if dye.is_empty() {
                    return Err(p.missing(&place, "the id of <dyeId>"));
                }
                p.once(&mut dye_id, dye, tag, &place)
            }
            _ => p.skip(tag),
        })?;
        let Some(kind) = kind else {
            return Err(self.missing(&place, "<type>"));
        };
        let dye_id = match dye_id {
            Some(dye) => dye,
            None if self.version == "1.0" => MISSING_DYE_1_0.to_owned(),
            None => return Err(self.missing(&place, "<dyeId>")),
        };
        Ok(Target { id, dye_id, kind })
    }

    fn experiment(&mut self, start: &BytesStart<'_>) -> Result<Experiment, RdmlError> {
        let id = self.id(start, Tag::Experiment, "the document")?;
        let place = format!("experiment {:?}", echo(&id));
        let mut runs = Vec::new();
        self.children(Tag::Experiment, &place, |p, tag, start| match tag {
            Tag::Run => {
                runs.push(p.run(&start, &place)?);
                Ok(())
            }
            _ => p.skip(tag),
        })?;
        Ok(Experiment { id, runs })
    }

    fn run(&mut self, start: &BytesStart<'_>, experiment: &str) -> Result<Run, RdmlError> {
        let id = self.id(start, Tag::Run, experiment)?;
        let place = format!("{experiment} run {:?}", echo(&id));
        let mut instrument = None;
        let mut cq_detection_method = None;
        let mut format = None;
        let mut raw = Vec::new();
        self.children(Tag::Run, &place, |p, tag, start| match tag {
            Tag::Instrument => {
                let text = p.text(tag, &place)?;
                p.once(&mut instrument, text, tag, &place)
            }
            Tag::CqDetectionMethod => {
                let text = p.token(tag, &place)?;
                p.once(&mut cq_detection_method, text, tag, &place)
            }
            Tag::PcrFormat => {
                let f = p.pcr_format(&place)?;
                p.once(&mut format, f, tag, &place)
            }
            Tag::React => {
                raw.push(p.react(&start, &place)?);
                Ok(())
            }
            _ => p.skip(tag),
        })?;
        let Some(format) = format else {
            return Err(self.missing(&place, "<pcrFormat>"));
        };
        let mut reactions = Vec::with_capacity(raw.len());
        for RawReaction {
            id: text,
            line,
            mut reaction,
        } in raw
        {
            reaction.id = reaction_id(&text, &format, self.version == "1.0").map_err(|reason| {
                RdmlError::BadReactionId {
                    line,
                    place: place.clone(),
                    text: echo(&text),
                    reason,
                }
            })?;
            reactions.push(reaction);
        }
        Ok(Run {
            id,
            instrument,
            cq_detection_method,
            format,
            reactions,
        })
    }

    fn pcr_format(&mut self, place: &str) -> Result<PcrFormat, RdmlError> {
        let line = self.line();
        let bad = |reason: String| RdmlError::BadPcrFormat {
            line,
            place: place.to_owned(),
            reason,
        };
        if self.version == "1.0" {
            let text = self.token(Tag::PcrFormat, place)?;
            return Ok(pcr_format_1_0(&text));
        }
        let mut rows = None;
        let mut columns = None;
        let mut row_label = None;
        let mut column_label = None;
        self.children(Tag::PcrFormat, place, |p, tag, _| match tag {
            Tag::Rows => {
                let t = p.token(tag, place)?;
                p.once(&mut rows, t, tag, place)
            }
            Tag::Columns => {
                let t = p.token(tag, place)?;
                p.once(&mut columns, t, tag, place)
            }
            Tag::RowLabel => {
                let t = p.token(tag, place)?;
                p.once(&mut row_label, t, tag, place)
            }
            Tag::ColumnLabel => {
                let t = p.token(tag, place)?;
                p.once(&mut column_label, t, tag, place)
            }
            _ => p.skip(tag),
        })?;
        let (Some(rows), Some(columns), Some(row_label), Some(column_label)) =
            (rows, columns, row_label, column_label)
        else {
            return Err(self.missing(
                place,
                "<rows>, <columns>, <rowLabel> or <columnLabel> of <pcrFormat>",
            ));
        };
        // rows -1 is the free format (RDML_v1_3_REC.xsd, pcrFormatType), kept as 0.
        let rows = match rows.parse::<i32>() {
            Ok(-1) => 0,
            Ok(n) if n >= 1 => u32::try_from(n).map_err(|_| bad(format!("{n} rows")))?,
            _ => return Err(bad(format!("rows {:?} is not -1 or 1 and up", echo(&rows)))),
        };
        let columns = match columns.parse::<i32>() {
            Ok(n) if n >= 1 => u32::try_from(n).map_err(|_| bad(format!("{n} columns")))?,
            _ => {
                return Err(bad(format!(
                    "columns {:?} is not a whole number from 1 up",
                    echo(&columns)
                )));
            }
        };
        for label in [&row_label, &column_label] {
            if !LABELS.contains(&label.as_str()) {
                return Err(bad(format!(
                    "label {:?} is not ABC, 123 or A1a1",
                    echo(label)
                )));
            }
        }
        Ok(PcrFormat {
            rows,
            columns,
            row_label,
            column_label,
        })
    }

    fn react(&mut self, start: &BytesStart<'_>, run: &str) -> Result<RawReaction, RdmlError> {
        let line = self.line();
        let id = self.id(start, Tag::React, run)?;
        let place = format!("{run} reaction {}", echo(&id));
        let mut sample = None;
        let mut data = Vec::new();
        self.children(Tag::React, &place, |p, tag, start| match tag {
            Tag::Sample => {
                let sample_id = p.id(&start, tag, &place)?;
                p.skip(tag)?;
                p.once(&mut sample, sample_id, tag, &place)
            }
            Tag::Data => {
                data.push(p.data(&place)?);
                Ok(())
            }
            _ => p.skip(tag),
        })?;
        let Some(sample_id) = sample else {
            return Err(self.missing(&place, "<sample>"));
        };
        Ok(RawReaction {
            id,
            line,
            reaction: Reaction {
                id: 0,
                sample_id,
                data,
            },
        })
    }

    fn data(&mut self, reaction: &str) -> Result<ReactionData, RdmlError> {
        let mut target = None::<String>;
        let mut cq = None;
        let mut excluded = None;
        let mut threshold = None;
        let mut background = None;
        let mut background_slope = None;
        let mut points: Vec<(u32, f64)> = Vec::new();
        let place_of = |target: &Option<String>| match target {
            Some(t) => format!("{reaction} target {:?}", echo(t)),
            None => reaction.to_owned(),
        };
        self.children(Tag::Data, reaction, |p, tag, start| {
            let place = place_of(&target);
            match tag {
                Tag::Tar => {
                    let id = p.id(&start, tag, &place)?;
                    p.skip(tag)?;
                    p.once(&mut target, id, tag, &place)
                }
                Tag::Cq => {
                    let v = p.number(tag, &place)?;
                    p.once(&mut cq, v, tag, &place)
                }
                Tag::Excl => {
                    let v = p.text(tag, &place)?;
                    p.once(&mut excluded, v, tag, &place)
                }
                Tag::QuantFluor => {
                    let v = p.number(tag, &place)?;
                    p.once(&mut threshold, v, tag, &place)
                }
                Tag::BgFluor => {
                    let v = p.number(tag, &place)?;
                    p.once(&mut background, v, tag, &place)
                }
                Tag::BgFluorSlp => {
                    let v = p.number(tag, &place)?;
                    p.once(&mut background_slope, v, tag, &place)
                }
                Tag::Adp => {
                    points.push(p.adp(&place)?);
                    Ok(())
                }
                _ => p.skip(tag),
            }
        })?;
        let place = place_of(&target);
        let Some(target_id) = target else {
            return Err(self.missing(&place, "<tar>"));
        };
        let line = self.line();
        let fluorescence = curve(points).map_err(|problem| match problem {
            CurveProblem::Duplicate(cycle) => RdmlError::DuplicateCycle {
                line,
                place: place.clone(),
                cycle,
            },
            CurveProblem::Missing {
                cycle,
                points,
                last,
            } => RdmlError::MissingCycle {
                line,
                place: place.clone(),
                cycle,
                points,
                last,
            },
        })?;
        Ok(ReactionData {
            target_id,
            // -1 is RDML's "no Cq" (RDML_v1_3_REC.xsd, dataType/cq).
            cq: cq.filter(|&v| v != -1.0),
            excluded,
            threshold,
            background,
            background_slope,
            fluorescence,
        })
    }

    fn adp(&mut self, place: &str) -> Result<(u32, f64), RdmlError> {
        let mut cycle = None;
        let mut fluor = None;
        self.children(Tag::Adp, place, |p, tag, _| match tag {
            Tag::Cyc => {
                let line = p.line();
                let text = p.text(tag, place)?;
                let c = parse_cycle(&text).ok_or_else(|| RdmlError::BadCycle {
                    line,
                    place: place.to_owned(),
                    text: echo(text.trim()),
                })?;
                p.once(&mut cycle, c, tag, place)
            }
            Tag::Fluor => {
                let v = p.number(tag, place)?;
                p.once(&mut fluor, v, tag, place)
            }
            _ => p.skip(tag),
        })?;
        match (cycle, fluor) {
            (Some(c), Some(f)) => Ok((c, f)),
            (None, _) => Err(self.missing(place, "<cyc> of <adp>")),
            (_, None) => Err(self.missing(place, "<fluor> of <adp>")),
        }
    }
}

/// Why amplification points do not make a curve.
enum CurveProblem {
    Duplicate(u32),
    Missing {
        cycle: u32,
        points: usize,
        last: u32,
    },
}

/// Orders (cycle, fluorescence) points into a curve indexed by cycle - 1: cycles must
/// be 1, 2, 3… each once. The schema does not order `adp` elements, so neither do we.
fn curve(mut points: Vec<(u32, f64)>) -> Result<Vec<f64>, CurveProblem> {
    points.sort_by_key(|&(cycle, _)| cycle);
    if let Some(pair) = points.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(CurveProblem::Duplicate(pair[0].0));
    }
    let last = points.last().map_or(0, |&(cycle, _)| cycle);
    for (expected, &(cycle, _)) in (1u32..).zip(&points) {
        if cycle != expected {
            return Err(CurveProblem::Missing {
                cycle: expected,
                points: points.len(),
                last,
            });
        }
    }
    Ok(points.into_iter().map(|(_, fluor)| fluor).collect())
}

/// An xs:float (or xs:double) text as a finite f64: white space around it is allowed
/// (the type collapses it); NaN and infinities are refused.
fn parse_finite(text: &str) -> Option<f64> {
    text.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

/// A cycle number: a decimal in the schema (`cyc` is xs:float), but it counts cycles,
/// so 7 and 7.0 are fine and 7.5 is not.
fn parse_cycle(text: &str) -> Option<u32> {
    let value = parse_finite(text)?;
    if value.fract() != 0.0 || value < 1.0 || value > f64::from(u32::MAX) {
        return None;
    }
    // Whole, within 1..=u32::MAX: the cast is exact.
    Some(value as u32)
}

/// A reaction id: a positive integer (RDML 1.1+, xs:positiveInteger); in RDML 1.0 a
/// well label of the plate format ("B3" on a 96-well plate), converted as rdmlpython's
/// migration to 1.1 does.
fn reaction_id(text: &str, format: &PcrFormat, rdml_1_0: bool) -> Result<u32, String> {
    let trimmed = text.trim();
    let digits = trimmed.strip_prefix('+').unwrap_or(trimmed);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return match digits.parse::<u32>() {
            Ok(0) => Err("reaction ids count from 1".to_owned()),
            Ok(n) => Ok(n),
            Err(_) => Err("too large".to_owned()),
        };
    }
    if !rdml_1_0 {
        return Err("not a whole number from 1 up".to_owned());
    }
    well_label_to_id(trimmed, format)
        .ok_or_else(|| format!("not a well of a {}x{} plate", format.rows, format.columns))
}

/// The reaction id of an RDML 1.0 well label ("B3", or "A1a1" on the 3072-well array).
fn well_label_to_id(label: &str, format: &PcrFormat) -> Option<u32> {
    if format.rows == 0 {
        return None;
    }
    let (row, column) = if format.row_label == "A1a1" {
        // Block letter, block number, position letter, position number: "D12h8".
        let mut chars = label.chars();
        let block_row = letter_index(chars.next()?, 'A')?;
        let rest = chars.as_str();
        let split = rest.find(|c: char| !c.is_ascii_digit())?;
        // `split` is the offset of a char, so both halves are whole strings.
        let (block_number, rest) = rest.split_at(split);
        let block_column = block_number.parse::<u32>().ok()?.checked_sub(1)?;
        let mut chars = rest.chars();
        let pos_row = letter_index(chars.next()?, 'a')?;
        let pos_column = chars.as_str().parse::<u32>().ok()?.checked_sub(1)?;
        if pos_row >= 8 || pos_column >= 8 {
            return None;
        }
        (block_row * 8 + pos_row, block_column * 8 + pos_column)
    } else {
        let split = label.find(|c: char| c.is_ascii_digit())?;
        let (letters, number) = label.split_at(split);
        let mut letters = letters.chars();
        let row = letter_index(letters.next()?, 'A')?;
        if letters.next().is_some() {
            return None;
        }
        (row, number.parse::<u32>().ok()?.checked_sub(1)?)
    };
    if row >= format.rows || column >= format.columns {
        return None;
    }
    row.checked_mul(format.columns)?
        .checked_add(column)?
        .checked_add(1)
}

/// The 0-based index of an ASCII letter counted from `first` ('A' or 'a'), either case.
fn letter_index(c: char, first: char) -> Option<u32> {
    if !c.is_ascii_alphabetic() {
        return None;
    }
    let c = if first.is_ascii_uppercase() {
        c.to_ascii_uppercase()
    } else {
        c.to_ascii_lowercase()
    };
    Some(u32::from(c) - u32::from(first))
}

/// An RDML 1.0 plate format (a text such as "96-well plate; A1-H12") as rows and
/// columns, as rdmlpython's `migrate_version_1_0_to_1_1` maps it. Formats not listed
/// are the free format, as the 1.0 schema says to treat them.
fn pcr_format_1_0(text: &str) -> PcrFormat {
    let (rows, columns, row_label, column_label) = match text {
        "single-well; 1" | "single-well" => (1, 1, "123", "123"),
        "48-well plate; A1-F8" => (6, 8, "ABC", "123"),
        "96-well plate; A1-H12" => (8, 12, "ABC", "123"),
        "384-well plate; A1-P24" => (16, 24, "ABC", "123"),
        "3072-well plate; A1a1-D12h8" => (32, 96, "A1a1", "A1a1"),
        "32-well rotor; 1-32" => (32, 1, "123", "123"),
        "72-well rotor; 1-72" => (72, 1, "123", "123"),
        "100-well rotor; 1-100" => (100, 1, "123", "123"),
        _ => (0, 1, "123", "123"),
    };
    PcrFormat {
        rows,
        columns,
        row_label: row_label.to_owned(),
        column_label: column_label.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_whole_numbers_from_one() {
        assert_eq!(parse_cycle("7"), Some(7));
        assert_eq!(parse_cycle(" 7.0 "), Some(7));
        assert_eq!(parse_cycle("7.5"), None);
        assert_eq!(parse_cycle("0"), None);
        assert_eq!(parse_cycle("-3"), None);
        assert_eq!(parse_cycle("NaN"), None);
        assert_eq!(parse_cycle("1e12"), None);
    }

    #[test]
    fn numbers_must_be_finite() {
        assert_eq!(parse_finite("0.4853"), Some(0.4853));
        assert_eq!(parse_finite("-1.5E3"), Some(-1500.0));
        for bad in ["NaN", "INF", "-INF", "inf", "", "1,5", "abc"] {
            assert_eq!(parse_finite(bad), None, "{bad}");
        }
    }

    #[test]
    fn curves_need_every_cycle_once() {
        assert_eq!(
            curve(vec![(2, 0.2), (1, 0.1)]).ok(),
            Some(vec![0.1, 0.2]),
            "order in the file does not matter"
        );
        assert!(matches!(
            curve(vec![(1, 0.1), (2, 0.2), (2, 0.3)]),
            Err(CurveProblem::Duplicate(2))
        ));
        assert!(matches!(
            curve(vec![(1, 0.1), (3, 0.3)]),
            Err(CurveProblem::Missing {
                cycle: 2,
                points: 2,
                last: 3
            })
        ));
        assert!(matches!(
            curve(vec![(2, 0.1)]),
            Err(CurveProblem::Missing { cycle: 1, .. })
        ));
        assert_eq!(curve(Vec::new()).ok(), Some(Vec::new()));
    }

    #[test]
    fn rdml_1_0_well_labels_become_ids() {
        let p96 = pcr_format_1_0("96-well plate; A1-H12");
        assert_eq!(reaction_id("B3", &p96, true), Ok(15));
        assert_eq!(reaction_id("h12", &p96, true), Ok(96));
        assert!(reaction_id("I1", &p96, true).is_err());
        assert!(reaction_id("A13", &p96, true).is_err());
        assert!(reaction_id("B3", &p96, false).is_err());
        assert_eq!(reaction_id("15", &p96, false), Ok(15));
        assert!(reaction_id("0", &p96, false).is_err());
        let array = pcr_format_1_0("3072-well plate; A1a1-D12h8");
        assert_eq!(reaction_id("A1a1", &array, true), Ok(1));
        assert_eq!(reaction_id("D12h8", &array, true), Ok(3072));
        for id in [1, 2, 95, 96, 97, 1000, 3072] {
            let label = array.well_label(id).unwrap();
            assert_eq!(reaction_id(&label, &array, true), Ok(id), "{label}");
        }
        let p384 = pcr_format_1_0("384-well plate; A1-P24");
        for id in 1..=384 {
            let label = p384.well_label(id).unwrap();
            assert_eq!(reaction_id(&label, &p384, true), Ok(id), "{label}");
        }
    }
}
