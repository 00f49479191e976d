//! The response codec: [`Response`]'s opcode, body encoding and decoding (an ok body,
//! or a non-ok status's bounded message as a [`DeviceError`]).

use super::*;

impl Response {
    /// The opcode of the command this answers.
    pub fn opcode(&self) -> Opcode {
        match self {
            Response::DeviceInfo(_) => Opcode::DeviceInfo,
            Response::Requisition(_) => Opcode::Requisition,
            Response::ReturnSegment => Opcode::ReturnSegment,
            Response::TaxCodes(_) => Opcode::TaxCodes,
            Response::Sign(_) => Opcode::Sign,
            Response::Upload(_) => Opcode::Upload,
            Response::ReportAndClear(_) => Opcode::ReportAndClear,
            Response::Inventory(_) => Opcode::Inventory,
            Response::Nop(_) => Opcode::Nop,
            Response::SetFaults => Opcode::SetFaults,
        }
    }

    /// Appends the body of this answer to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        match self {
            Response::DeviceInfo(info) => {
                put_short_string(out, &info.device_id, "device id", DEVICE_STRING_BYTES_MAX)?;
                put_short_string(out, &info.firmware, "firmware", DEVICE_STRING_BYTES_MAX)?;
                out.extend_from_slice(&info.sm2_public_key);
                out.push(info.tax_code_algorithm as u8);
                out.extend_from_slice(&info.batch_max.to_le_bytes());
                limit("taxpayers", info.taxpayers.len(), TAXPAYERS_MAX)?;
                out.extend_from_slice(&(info.taxpayers.len() as u16).to_le_bytes());
                for t in &info.taxpayers {
                    out.extend_from_slice(t);
                }
            }
            Response::Requisition(segment) => put_segment(out, segment),
            Response::ReturnSegment | Response::SetFaults => {}
            Response::TaxCodes(items) => {
                limit("tax code results", items.len(), TAX_CODES_BATCH_MAX)?;
                out.extend_from_slice(&(items.len() as u32).to_le_bytes());
                out.extend_from_slice(items.as_slice().as_bytes());
            }
            Response::Sign(sig) => out.extend_from_slice(sig),
            Response::Upload(statuses) => {
                limit("upload results", statuses.len(), UPLOAD_BATCH_MAX)?;
                out.extend_from_slice(&(statuses.len() as u32).to_le_bytes());
                out.extend(statuses.iter().map(|s| *s as u8));
            }
            Response::ReportAndClear(p) => {
                out.extend_from_slice(&p.taxpayer);
                for v in [
                    p.period_start_ms,
                    p.period_end_ms,
                    p.blue_count,
                    p.red_count,
                    p.uploaded_count,
                ] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                for v in [p.amount_fen, p.tax_fen, p.total_fen] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
            Response::Inventory(list) => {
                limit("inventory taxpayers", list.len(), TAXPAYERS_MAX)?;
                out.extend_from_slice(&(list.len() as u16).to_le_bytes());
                for inv in list {
                    limit(
                        "inventory segments",
                        inv.segments.len(),
                        INVENTORY_SEGMENTS_MAX,
                    )?;
                    out.extend_from_slice(&inv.taxpayer);
                    out.extend_from_slice(&inv.remaining.to_le_bytes());
                    out.extend_from_slice(&inv.issued.to_le_bytes());
                    out.extend_from_slice(&inv.uploaded.to_le_bytes());
                    out.extend_from_slice(&(inv.segments.len() as u32).to_le_bytes());
                    for s in &inv.segments {
                        put_segment(out, &s.segment);
                        s.holder.encode(out);
                        out.extend_from_slice(&s.request_id.to_le_bytes());
                        out.extend_from_slice(&s.coded_end.to_le_bytes());
                    }
                }
            }
            Response::Nop(bytes) => {
                limit("nop bytes", bytes.len(), NOP_BYTES_MAX)?;
                out.extend_from_slice(bytes);
            }
        }
        Ok(())
    }

    /// Decodes an ok-status response body for the command `op`.
    pub fn decode(op: Opcode, body: &[u8]) -> Result<Response, DecodeError> {
        let mut r = Reader::new(body);
        let resp = match op {
            Opcode::DeviceInfo => {
                let device_id = r.short_string("device id", DEVICE_STRING_BYTES_MAX)?;
                let firmware = r.short_string("firmware", DEVICE_STRING_BYTES_MAX)?;
                let sm2_public_key = r.array("sm2 public key")?;
                let alg = r.u8("tax code algorithm")?;
                let tax_code_algorithm =
                    TaxCodeAlgorithm::from_u8(alg).ok_or(DecodeError::InvalidValue {
                        what: "tax code algorithm",
                        value: u64::from(alg),
                    })?;
                let batch_max = r.u32("batch max")?;
                let n = r.u16("taxpayer count")? as usize;
                let n = r.count(n, TAXPAYERS_MAX, TAXPAYER_BYTES, "taxpayers")?;
                let mut taxpayers = Vec::with_capacity(n);
                for _ in 0..n {
                    taxpayers.push(r.array("taxpayer")?);
                }
                Response::DeviceInfo(DeviceInfo {
                    device_id,
                    firmware,
                    sm2_public_key,
                    tax_code_algorithm,
                    batch_max,
                    taxpayers,
                })
            }
            Opcode::Requisition => Response::Requisition(get_segment(&mut r)?),
            Opcode::ReturnSegment => Response::ReturnSegment,
            Opcode::SetFaults => Response::SetFaults,
            Opcode::TaxCodes => {
                let n = r.u32("result count")? as usize;
                let n = r.count(
                    n,
                    TAX_CODES_BATCH_MAX,
                    TAX_CODE_ITEM_BYTES,
                    "tax code results",
                )?;
                let bytes = r.take(n * TAX_CODE_ITEM_BYTES, "tax code results")?;
                let items = <[TaxCodeItem]>::ref_from_bytes(bytes)
                    .map_err(|_| DecodeError::Truncated("tax code results"))?;
                for item in items {
                    if item.status().is_none() {
                        return Err(DecodeError::InvalidValue {
                            what: "tax code status",
                            value: u64::from(item.status),
                        });
                    }
                    if item.reserved != [0; 3] {
                        return Err(DecodeError::InvalidValue {
                            what: "tax code item reserved",
                            value: u64::from(u32::from_le_bytes([
                                item.reserved[0],
                                item.reserved[1],
                                item.reserved[2],
                                0,
                            ])),
                        });
                    }
                }
                Response::TaxCodes(items.to_vec())
            }
            Opcode::Sign => Response::Sign(r.array("signature")?),
            Opcode::Upload => {
                let n = r.u32("result count")? as usize;
                let n = r.count(n, UPLOAD_BATCH_MAX, 1, "upload results")?;
                let bytes = r.take(n, "upload results")?;
                let mut statuses = Vec::with_capacity(n);
                for &b in bytes {
                    statuses.push(UploadStatus::from_u8(b).ok_or(DecodeError::InvalidValue {
                        what: "upload status",
                        value: u64::from(b),
                    })?);
                }
                Response::Upload(statuses)
            }
            Opcode::ReportAndClear => Response::ReportAndClear(PeriodReport {
                taxpayer: r.array("taxpayer")?,
                period_start_ms: r.u64("period start")?,
                period_end_ms: r.u64("period end")?,
                blue_count: r.u64("blue count")?,
                red_count: r.u64("red count")?,
                uploaded_count: r.u64("uploaded count")?,
                amount_fen: r.i64("amount")?,
                tax_fen: r.i64("tax")?,
                total_fen: r.i64("total")?,
            }),
            Opcode::Inventory => {
                let n = r.u16("taxpayer count")? as usize;
                // 18 + 3 x 8 + 4 bytes is the smallest per-taxpayer record.
                let n = r.count(n, TAXPAYERS_MAX, 46, "inventory taxpayers")?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    let taxpayer = r.array("taxpayer")?;
                    let remaining = r.u64("remaining")?;
                    let issued = r.u64("issued")?;
                    let uploaded = r.u64("uploaded")?;
                    let m = r.u32("segment count")? as usize;
                    let m = r.count(
                        m,
                        INVENTORY_SEGMENTS_MAX,
                        HELD_SEGMENT_BYTES,
                        "inventory segments",
                    )?;
                    let mut segments = Vec::with_capacity(m);
                    for _ in 0..m {
                        segments.push(HeldSegment {
                            segment: get_segment(&mut r)?,
                            holder: Holder::from_bytes(&r.array("holder")?),
                            request_id: r.u64("request id")?,
                            coded_end: r.u32("coded end")?,
                        });
                    }
                    list.push(TaxpayerInventory {
                        taxpayer,
                        remaining,
                        issued,
                        uploaded,
                        segments,
                    });
                }
                Response::Inventory(list)
            }
            Opcode::Nop => Response::Nop(r.rest().to_vec()),
        };
        r.finish()?;
        Ok(resp)
    }

    /// Decodes a response frame to the command `request` (whose opcode the caller recorded
    /// when sending): `Ok(Ok(_))` for a successful answer, `Ok(Err(_))` for a device
    /// error, `Err(_)` when the frame does not decode or does not answer that command.
    pub fn decode_frame(
        request: Opcode,
        header: &FrameHeader,
        body: &[u8],
    ) -> Result<Result<Response, DeviceError>, DecodeError> {
        if header.opcode != request.response_byte() {
            return Err(DecodeError::UnexpectedOpcode(header.opcode));
        }
        let code = header.status.get();
        let status = Status::from_u16(code).ok_or(DecodeError::UnknownStatus(code))?;
        if status == Status::Ok {
            return Response::decode(request, body).map(Ok);
        }
        if body.len() > ERROR_MESSAGE_BYTES_MAX {
            return Err(DecodeError::LimitExceeded {
                what: "error message",
                value: body.len() as u64,
                max: ERROR_MESSAGE_BYTES_MAX as u64,
            });
        }
        let message = core::str::from_utf8(body)
            .map_err(|_| DecodeError::InvalidUtf8("error message"))?
            .to_owned();
        Ok(Err(DeviceError { status, message }))
    }
}
