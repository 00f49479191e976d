//! The request codec: [`Request`]'s opcode, body encoding (whole, or as [`BodyParts`]
//! that a transport copies without assembling) and decoding.

use super::*;

/// A request body as two borrowed pieces whose concatenation is exactly what
/// [`Request::encode_body`] appends: a short head (a TaxCodes batch's holder and item
/// count, an Upload batch's item count, or nothing) and the bulk, already in wire layout
/// ([`Request::body_parts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyParts<'a> {
    head: [u8; BODY_HEAD_BYTES_MAX],
    head_len: usize,
    bulk: &'a [u8],
}

impl<'a> BodyParts<'a> {
    /// The head (0, 4 or 24 bytes).
    pub fn head(&self) -> &[u8] {
        &self.head[..self.head_len]
    }

    /// The bulk bytes after the head.
    pub fn bulk(&self) -> &'a [u8] {
        self.bulk
    }

    /// Body bytes in all.
    pub fn len(&self) -> usize {
        self.head_len + self.bulk.len()
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Largest [`BodyParts`] head: a TaxCodes holder and count.
const BODY_HEAD_BYTES_MAX: usize = HOLDER_BYTES + 4;

impl Request {
    /// The opcode of this command.
    pub fn opcode(&self) -> Opcode {
        match self {
            Request::DeviceInfo => Opcode::DeviceInfo,
            Request::Requisition { .. } => Opcode::Requisition,
            Request::ReturnSegment { .. } => Opcode::ReturnSegment,
            Request::TaxCodes(_) => Opcode::TaxCodes,
            Request::Sign { .. } => Opcode::Sign,
            Request::Upload(_) => Opcode::Upload,
            Request::ReportAndClear { .. } => Opcode::ReportAndClear,
            Request::Inventory(_) => Opcode::Inventory,
            Request::Nop(_) => Opcode::Nop,
            Request::SetFaults(_) => Opcode::SetFaults,
        }
    }

    /// Appends the body of this command to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Request::DeviceInfo => {}
            Request::Requisition {
                taxpayer,
                count,
                holder,
                request_id,
            } => {
                out.extend_from_slice(taxpayer);
                out.extend_from_slice(&count.to_le_bytes());
                holder.encode(out);
                out.extend_from_slice(&request_id.to_le_bytes());
            }
            Request::ReturnSegment {
                taxpayer,
                segment,
                holder,
            } => {
                out.extend_from_slice(taxpayer);
                put_segment(out, segment);
                holder.encode(out);
            }
            Request::TaxCodes(batch) => {
                batch.holder.encode(out);
                batch.raw.encode(out);
            }
            Request::Sign { digest } => out.extend_from_slice(digest),
            Request::Upload(batch) => batch.raw.encode(out),
            Request::ReportAndClear {
                taxpayer,
                period_end_ms,
            } => {
                out.extend_from_slice(taxpayer);
                out.extend_from_slice(&period_end_ms.to_le_bytes());
            }
            Request::Inventory(InventoryScope::All) => out.push(0),
            Request::Inventory(InventoryScope::Taxpayer(t)) => {
                out.push(1);
                out.extend_from_slice(t);
            }
            Request::Inventory(InventoryScope::Holder(h)) => {
                out.push(2);
                h.encode(out);
            }
            Request::Nop(bytes) => {
                limit("nop bytes", bytes.len(), NOP_BYTES_MAX)?;
                out.extend_from_slice(bytes);
            }
            Request::SetFaults(f) => {
                out.extend_from_slice(&f.latency_us.to_le_bytes());
                out.extend_from_slice(&f.drop_every_nth_connection.to_le_bytes());
                out.push(f.refuse);
                out.extend_from_slice(&f.stall_ms.to_le_bytes());
                out.push(f.reset_connections);
            }
        }
        Ok(())
    }

    /// The body of the bulk commands (TaxCodes, Upload, Nop) as [`BodyParts`] borrowed
    /// from the request, checked as [`Request::encode_body`] checks it; `Ok(None)` for
    /// the other commands, whose bodies are small (encode those). A transport copies the
    /// parts straight to their destination (the PCIe data area) instead of encoding a
    /// ~1 MB batch into a buffer and copying that again.
    pub fn body_parts(&self) -> Result<Option<BodyParts<'_>>, EncodeError> {
        fn batch<'b>(holder: Option<&Holder>, raw: &'b RawBatch) -> BodyParts<'b> {
            let mut head = [0u8; BODY_HEAD_BYTES_MAX];
            let mut len = 0;
            if let Some(h) = holder {
                head[..HOLDER_BYTES].copy_from_slice(&h.to_bytes());
                len = HOLDER_BYTES;
            }
            // Pushes keep the count within the batch maxima, far below u32::MAX.
            head[len..len + 4].copy_from_slice(&(raw.starts.len() as u32).to_le_bytes());
            BodyParts {
                head,
                head_len: len + 4,
                bulk: &raw.wire,
            }
        }
        Ok(match self {
            Request::TaxCodes(b) => Some(batch(Some(&b.holder), &b.raw)),
            Request::Upload(b) => Some(batch(None, &b.raw)),
            Request::Nop(bytes) => {
                limit("nop bytes", bytes.len(), NOP_BYTES_MAX)?;
                Some(BodyParts {
                    head: [0; BODY_HEAD_BYTES_MAX],
                    head_len: 0,
                    bulk: bytes,
                })
            }
            _ => None,
        })
    }

    /// Decodes a request body for `opcode` (the header's opcode byte).
    pub fn decode(opcode: u8, body: &[u8]) -> Result<Request, DecodeError> {
        if opcode & RESPONSE_FLAG != 0 {
            return Err(DecodeError::UnexpectedOpcode(opcode));
        }
        let op = Opcode::from_u8(opcode).ok_or(DecodeError::UnknownOpcode(opcode))?;
        // Batches parse their whole body themselves.
        match op {
            Opcode::TaxCodes => {
                let (holder, rest) = split_holder(body)?;
                return Ok(Request::TaxCodes(InvoiceBatch {
                    holder,
                    raw: RawBatch::decode(rest, TAX_CODES_BATCH_MAX, 0, TAX_CODES_ITEMS)?,
                }));
            }
            Opcode::Upload => {
                return Ok(Request::Upload(UploadBatch {
                    raw: RawBatch::decode(
                        body,
                        UPLOAD_BATCH_MAX,
                        TAX_CODE_BYTES,
                        "upload batch items",
                    )?,
                }))
            }
            Opcode::Nop => {
                // A frame body is already bounded by FRAME_BODY_BYTES_MAX == NOP_BYTES_MAX.
                if body.len() > NOP_BYTES_MAX {
                    return Err(DecodeError::LimitExceeded {
                        what: "nop bytes",
                        value: body.len() as u64,
                        max: NOP_BYTES_MAX as u64,
                    });
                }
                return Ok(Request::Nop(body.to_vec()));
            }
            _ => {}
        }
        let mut r = Reader::new(body);
        let req = match op {
            Opcode::DeviceInfo => Request::DeviceInfo,
            Opcode::Requisition => Request::Requisition {
                taxpayer: r.array("taxpayer")?,
                count: r.u32("count")?,
                holder: Holder::from_bytes(&r.array("holder")?),
                request_id: r.u64("request id")?,
            },
            Opcode::ReturnSegment => Request::ReturnSegment {
                taxpayer: r.array("taxpayer")?,
                segment: get_segment(&mut r)?,
                holder: Holder::from_bytes(&r.array("holder")?),
            },
            Opcode::Sign => Request::Sign {
                digest: r.array("digest")?,
            },
            Opcode::ReportAndClear => Request::ReportAndClear {
                taxpayer: r.array("taxpayer")?,
                period_end_ms: r.u64("period end")?,
            },
            Opcode::Inventory => match r.u8("inventory scope")? {
                0 => Request::Inventory(InventoryScope::All),
                1 => Request::Inventory(InventoryScope::Taxpayer(r.array("taxpayer")?)),
                2 => Request::Inventory(InventoryScope::Holder(Holder::from_bytes(
                    &r.array("holder")?,
                ))),
                other => {
                    return Err(DecodeError::InvalidValue {
                        what: "inventory scope",
                        value: u64::from(other),
                    })
                }
            },
            Opcode::SetFaults => Request::SetFaults(FaultConfig {
                latency_us: r.u32("latency")?,
                drop_every_nth_connection: r.u32("drop every nth")?,
                refuse: bool_byte(&mut r, "refuse")?,
                stall_ms: r.u32("stall")?,
                reset_connections: bool_byte(&mut r, "reset connections")?,
            }),
            Opcode::TaxCodes | Opcode::Upload | Opcode::Nop => {
                // Handled above; kept total rather than unreachable!().
                return Err(DecodeError::UnexpectedOpcode(opcode));
            }
        };
        r.finish()?;
        Ok(req)
    }
}
