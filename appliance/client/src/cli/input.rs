//! Input files of the `issue` command: JSON lines (one invoice per line) or CSV (one row
//! per line item; consecutive rows with the same seller and order id form one invoice).
//! Parsing turns each invoice into an [`IssueRequest`] or into a [`BadInput`] that names
//! its line; nothing bad is sent.

use appliance_core::money::tax_fen;
use appliance_core::{
    InvoiceCode, InvoiceKind, InvoiceNumber, IssueRequest, LineItem, RedReference, TaxRate,
    TaxpayerId,
};
use serde::Deserialize;

/// Input file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// JSON lines: one invoice object per line.
    Jsonl,
    /// CSV with a header row: one row per line item.
    Csv,
}

impl InputFormat {
    /// The format a file name implies: `.csv` is CSV, `.jsonl`/`.json`/`.ndjson` JSON
    /// lines.
    pub fn from_path(path: &std::path::Path) -> Option<InputFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "csv" => Some(InputFormat::Csv),
            "jsonl" | "json" | "ndjson" => Some(InputFormat::Jsonl),
            _ => None,
        }
    }
}

/// An invoice of the input, ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputInvoice {
    /// 1-based line of the file where the invoice starts.
    pub line: usize,
    /// The request.
    pub request: IssueRequest,
}

/// An invoice (or line) of the input that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput {
    /// 1-based line of the file.
    pub line: usize,
    /// Why.
    pub message: String,
}

/// A red invoice's reference to its original, as written in the input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedInput {
    /// Code of the original invoice: a number or a string of up to 12 digits.
    pub original_code: CodeInput,
    /// Number of the original invoice: a number or a string of up to 8 digits.
    pub original_number: CodeInput,
    /// Order id of the original.
    pub original_order_id: String,
}

/// A code or number written either as a JSON number or as a digit string (so that
/// zero-padded codes such as "012345678901" survive spreadsheets and JSON alike).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum CodeInput {
    /// As a number.
    Number(u64),
    /// As digits.
    Text(String),
}

impl CodeInput {
    fn value(&self, what: &str) -> Result<u64, String> {
        match self {
            CodeInput::Number(n) => Ok(*n),
            CodeInput::Text(s) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("{what} {s:?} is not a number")),
        }
    }
}

/// One line item as written in JSON input.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineInput {
    /// Goods or service name.
    pub name: String,
    /// Quantity (≥ 1).
    pub quantity: u32,
    /// Unit price in fen, tax excluded (negative on red invoices).
    pub unit_price_fen: i64,
}

/// One invoice as written in JSON input: the fields of [`IssueRequest`], with the amounts
/// optional (computed when absent) and `red` present for a red invoice.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvoiceInput {
    /// Seller's unified social credit code.
    pub seller: String,
    /// Order id: with the seller, the idempotency key.
    pub order_id: String,
    /// Buyer name.
    pub buyer_name: String,
    /// Buyer's unified social credit code, if any.
    #[serde(default)]
    pub buyer_taxpayer: Option<String>,
    /// Line items.
    pub lines: Vec<LineInput>,
    /// Tax rate in basis points (0, 100, 300, 500, 600, 900, 1300).
    pub tax_rate_bp: u16,
    /// Issuer-side reference (station, train, ...).
    #[serde(default)]
    pub issuer_ref: String,
    /// Σ quantity × unit price; computed when absent.
    #[serde(default)]
    pub amount_fen: Option<i64>,
    /// Tax; computed from the amount and rate when absent.
    #[serde(default)]
    pub tax_fen: Option<i64>,
    /// Amount + tax; computed when absent.
    #[serde(default)]
    pub total_fen: Option<i64>,
    /// For a red invoice: what it offsets.
    #[serde(default)]
    pub red: Option<RedInput>,
}

impl InvoiceInput {
    /// Checks the identifiers and fills in absent amounts. Other rules (lengths, line
    /// count, signs, ceilings) are the appliance's and are answered by it per request.
    pub fn into_request(self) -> Result<IssueRequest, String> {
        let seller = TaxpayerId::parse(self.seller.trim()).map_err(|e| format!("seller: {e}"))?;
        let buyer_taxpayer = match self.buyer_taxpayer.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(id) => Some(TaxpayerId::parse(id).map_err(|e| format!("buyer_taxpayer: {e}"))?),
        };
        let tax_rate = TaxRate::from_bp(self.tax_rate_bp).map_err(|e| e.to_string())?;
        let lines: Vec<LineItem> = self
            .lines
            .into_iter()
            .map(|l| LineItem {
                name: l.name,
                quantity: l.quantity,
                unit_price_fen: l.unit_price_fen,
            })
            .collect();
        let amount_fen = match self.amount_fen {
            Some(amount) => amount,
            None => lines
                .iter()
                .try_fold(0i64, |sum, l| {
                    i64::from(l.quantity)
                        .checked_mul(l.unit_price_fen)
                        .and_then(|a| sum.checked_add(a))
                })
                .ok_or("line amounts overflow")?,
        };
        let tax_fen = self
            .tax_fen
            .unwrap_or_else(|| tax_fen(amount_fen, tax_rate));
        let total_fen = match self.total_fen {
            Some(total) => total,
            None => amount_fen.checked_add(tax_fen).ok_or("total overflows")?,
        };
        let kind = match self.red {
            None => InvoiceKind::Blue,
            Some(red) => {
                let code = red.original_code.value("original_code")?;
                let number = red.original_number.value("original_number")?;
                InvoiceKind::Red(RedReference {
                    original_code: InvoiceCode::new(code).map_err(|e| e.to_string())?,
                    original_number: InvoiceNumber::new(
                        u32::try_from(number).map_err(|_| "original_number out of range")?,
                    )
                    .map_err(|e| e.to_string())?,
                    original_order_id: red.original_order_id,
                })
            }
        };
        Ok(IssueRequest {
            seller,
            order_id: self.order_id,
            buyer_name: self.buyer_name,
            buyer_taxpayer,
            lines,
            tax_rate,
            issuer_ref: self.issuer_ref,
            amount_fen,
            tax_fen,
            total_fen,
            kind,
        })
    }
}

/// What an input file held.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ParsedInput {
    /// Invoices to send, in file order.
    pub invoices: Vec<InputInvoice>,
    /// Invoices or lines that will not be sent, in file order.
    pub bad: Vec<BadInput>,
}

/// Parses JSON lines. Blank lines are skipped; any other line that is not a valid invoice
/// is reported with its number.
pub fn parse_jsonl(text: &str) -> ParsedInput {
    let mut parsed = ParsedInput::default();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let result = serde_json::from_str::<InvoiceInput>(line)
            .map_err(|e| format!("not an invoice: {e}"))
            .and_then(InvoiceInput::into_request);
        match result {
            Ok(request) => parsed.invoices.push(InputInvoice {
                line: line_no,
                request,
            }),
            Err(message) => parsed.bad.push(BadInput {
                line: line_no,
                message,
            }),
        }
    }
    parsed
}

/// CSV columns, in the order the documentation gives. Columns may appear in any order;
/// the header row names them.
pub const CSV_COLUMNS: [&str; 15] = [
    "seller",
    "order_id",
    "buyer_name",
    "buyer_taxpayer",
    "tax_rate_bp",
    "issuer_ref",
    "line_name",
    "quantity",
    "unit_price_fen",
    "amount_fen",
    "tax_fen",
    "total_fen",
    "red_original_code",
    "red_original_number",
    "red_original_order_id",
];
/// Columns every CSV file must have.
const CSV_REQUIRED: [&str; 7] = [
    "seller",
    "order_id",
    "buyer_name",
    "tax_rate_bp",
    "line_name",
    "quantity",
    "unit_price_fen",
];

/// One invoice being assembled from consecutive CSV rows.
struct CsvInvoice {
    line: usize,
    first: Vec<String>,
    lines: Vec<LineInput>,
    error: Option<String>,
}

/// Parses CSV (header row first). Consecutive rows with the same seller and order id are
/// one invoice; its invoice-level fields come from its first row (later rows may leave
/// them empty, and must not contradict them). A bad row makes its whole invoice bad,
/// reported at the invoice's first line.
pub fn parse_csv(text: &str) -> ParsedInput {
    let mut parsed = ParsedInput::default();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(h) => h.clone(),
        Err(e) => {
            parsed.bad.push(BadInput {
                line: 1,
                message: format!("CSV header: {e}"),
            });
            return parsed;
        }
    };
    let mut column = std::collections::HashMap::new();
    for (i, name) in headers.iter().enumerate() {
        if !CSV_COLUMNS.contains(&name) {
            parsed.bad.push(BadInput {
                line: 1,
                message: format!("unknown CSV column {name:?}"),
            });
            return parsed;
        }
        column.insert(name.to_owned(), i);
    }
    if let Some(missing) = CSV_REQUIRED.iter().find(|c| !column.contains_key(**c)) {
        parsed.bad.push(BadInput {
            line: 1,
            message: format!("CSV header lacks column {missing:?}"),
        });
        return parsed;
    }
    // Values by column name, "" when the column is absent.
    let field = |row: &[String], name: &str| -> String {
        column
            .get(name)
            .and_then(|&i| row.get(i))
            .cloned()
            .unwrap_or_default()
    };
    let invoice_fields: Vec<&str> = CSV_COLUMNS
        .iter()
        .copied()
        .filter(|c| !["line_name", "quantity", "unit_price_fen"].contains(c))
        .collect();

    let mut current: Option<CsvInvoice> = None;
    for record in reader.records() {
        let (line, row) = match record {
            Ok(r) => (
                r.position().map_or(0, |p| p.line() as usize),
                r.iter().map(str::to_owned).collect::<Vec<String>>(),
            ),
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line() as usize);
                if let Some(done) = current.take() {
                    finish_csv_invoice(done, &field, &mut parsed);
                }
                parsed.bad.push(BadInput {
                    line,
                    message: format!("CSV: {e}"),
                });
                continue;
            }
        };
        let same = current.as_ref().is_some_and(|c| {
            field(&c.first, "seller") == field(&row, "seller")
                && field(&c.first, "order_id") == field(&row, "order_id")
        });
        if !same {
            if let Some(done) = current.take() {
                finish_csv_invoice(done, &field, &mut parsed);
            }
            current = Some(CsvInvoice {
                line,
                first: row.clone(),
                lines: Vec::new(),
                error: None,
            });
        }
        let Some(invoice) = current.as_mut() else {
            continue;
        };
        if invoice.error.is_some() {
            continue;
        }
        for name in &invoice_fields {
            let value = field(&row, name);
            if !value.is_empty() && value != field(&invoice.first, name) {
                invoice.error = Some(format!(
                    "line {line}: {name} {value:?} differs from the invoice's first row"
                ));
            }
        }
        let quantity = field(&row, "quantity").parse::<u32>();
        let price = field(&row, "unit_price_fen").parse::<i64>();
        match (quantity, price) {
            (Ok(quantity), Ok(unit_price_fen)) => invoice.lines.push(LineInput {
                name: field(&row, "line_name"),
                quantity,
                unit_price_fen,
            }),
            (Err(_), _) => {
                invoice.error = Some(format!("line {line}: quantity is not a whole number"))
            }
            (_, Err(_)) => {
                invoice.error = Some(format!("line {line}: unit_price_fen is not an integer"))
            }
        }
    }
    if let Some(done) = current.take() {
        finish_csv_invoice(done, &field, &mut parsed);
    }
    parsed.bad.sort_by_key(|b| b.line);
    parsed
}

fn finish_csv_invoice(
    invoice: CsvInvoice,
    field: &impl Fn(&[String], &str) -> String,
    parsed: &mut ParsedInput,
) {
    let line = invoice.line;
    let result = invoice.error.map_or_else(
        || csv_invoice_input(&invoice.first, invoice.lines, field)?.into_request(),
        Err,
    );
    match result {
        Ok(request) => parsed.invoices.push(InputInvoice { line, request }),
        Err(message) => parsed.bad.push(BadInput { line, message }),
    }
}

fn csv_invoice_input(
    row: &[String],
    lines: Vec<LineInput>,
    field: &impl Fn(&[String], &str) -> String,
) -> Result<InvoiceInput, String> {
    let optional_i64 = |name: &str| -> Result<Option<i64>, String> {
        let v = field(row, name);
        if v.is_empty() {
            Ok(None)
        } else {
            v.parse()
                .map(Some)
                .map_err(|_| format!("{name} {v:?} is not an integer"))
        }
    };
    let red_code = field(row, "red_original_code");
    let red = if red_code.is_empty() {
        None
    } else {
        Some(RedInput {
            original_code: CodeInput::Text(red_code),
            original_number: CodeInput::Text(field(row, "red_original_number")),
            original_order_id: field(row, "red_original_order_id"),
        })
    };
    let rate = field(row, "tax_rate_bp");
    Ok(InvoiceInput {
        seller: field(row, "seller"),
        order_id: field(row, "order_id"),
        buyer_name: field(row, "buyer_name"),
        buyer_taxpayer: Some(field(row, "buyer_taxpayer")),
        lines,
        tax_rate_bp: rate
            .parse()
            .map_err(|_| format!("tax_rate_bp {rate:?} is not a number"))?,
        issuer_ref: field(row, "issuer_ref"),
        amount_fen: optional_i64("amount_fen")?,
        tax_fen: optional_i64("tax_fen")?,
        total_fen: optional_i64("total_fen")?,
        red,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SELLER: &str = "91350100M000100Y43";

    #[test]
    fn jsonl_computes_amounts_and_reports_bad_lines() {
        let text = format!(
            "{{\"seller\":\"{SELLER}\",\"order_id\":\"A\",\"buyer_name\":\"b\",\"lines\":[{{\"name\":\"t\",\"quantity\":2,\"unit_price_fen\":125}}],\"tax_rate_bp\":600}}\n\
             \n\
             {{\"seller\":\"91350100M000100Y44\",\"order_id\":\"B\",\"buyer_name\":\"b\",\"lines\":[],\"tax_rate_bp\":600}}\n\
             not json\n\
             {{\"seller\":\"{SELLER}\",\"order_id\":\"C\",\"buyer_name\":\"b\",\"lines\":[{{\"name\":\"t\",\"quantity\":1,\"unit_price_fen\":-100}}],\"tax_rate_bp\":900,\"red\":{{\"original_code\":\"012345678901\",\"original_number\":7,\"original_order_id\":\"A\"}}}}\n"
        );
        let parsed = parse_jsonl(&text);
        assert_eq!(parsed.invoices.len(), 2);
        let a = &parsed.invoices[0].request;
        assert_eq!((a.amount_fen, a.tax_fen, a.total_fen), (250, 15, 265));
        let c = &parsed.invoices[1];
        assert_eq!(c.line, 5);
        assert_eq!((c.request.amount_fen, c.request.tax_fen), (-100, -9));
        assert!(c.request.is_red());
        assert_eq!(
            parsed.bad.iter().map(|b| b.line).collect::<Vec<_>>(),
            [3, 4]
        );
    }

    #[test]
    fn csv_groups_consecutive_rows_and_reports_bad_invoices() {
        let text = format!(
            "seller,order_id,buyer_name,tax_rate_bp,line_name,quantity,unit_price_fen\n\
             {SELLER},A,b,900,t1,1,100\n\
             {SELLER},A,,,t2,2,50\n\
             {SELLER},B,b,900,t1,x,100\n\
             {SELLER},C,b,901,t1,1,100\n\
             {SELLER},D,b,900,t1,1,100\n"
        );
        let parsed = parse_csv(&text);
        assert_eq!(parsed.invoices.len(), 2);
        assert_eq!(parsed.invoices[0].request.lines.len(), 2);
        assert_eq!(parsed.invoices[0].request.amount_fen, 200);
        assert_eq!(parsed.invoices[1].line, 6);
        assert_eq!(
            parsed.bad.iter().map(|b| b.line).collect::<Vec<_>>(),
            [4, 5]
        );
    }
}
