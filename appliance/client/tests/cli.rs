//! The `issue` command end to end against the in-test server: JSON lines and CSV in, one
//! JSON line per invoice out, bad lines reported and not sent, reruns replayed.

mod common;

use appliance_client::cli::{run_issue, IssueArgs};
use appliance_client::pki::DevPki;
use common::{MockServer, SELLER};

fn args(
    server: &MockServer,
    pki: &DevPki,
    input: &std::path::Path,
    output: &std::path::Path,
) -> IssueArgs {
    let client = pki.client("ticketing").unwrap();
    let mut args = IssueArgs::new(
        server.service_addr.to_string(),
        pki.ca.clone(),
        input.to_owned(),
        output.to_owned(),
    );
    args.cert = Some(client.cert.clone());
    args.key = Some(client.key.clone());
    args.batch = 2;
    args.quiet = true;
    args
}

fn read_output(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn jsonl_round_trip_reports_bad_lines_and_replays_on_rerun() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(&dir.path().join("pki"), &[], &["ticketing"]).unwrap();
    let server = MockServer::start(&pki, 4096);
    let input = dir.path().join("orders.jsonl");
    let good = |order: &str| {
        format!(
            r#"{{"seller":"{SELLER}","order_id":"{order}","buyer_name":"Li Si","lines":[{{"name":"G1","quantity":2,"unit_price_fen":12500}}],"tax_rate_bp":900,"issuer_ref":"BJP"}}"#
        )
    };
    let text = [
        good("J1"),
        r#"{"seller":"91350100M000100Y44","order_id":"J-bad","buyer_name":"x","lines":[],"tax_rate_bp":900}"#.to_owned(),
        good("J2"),
        "{ not json".to_owned(),
        String::new(),
        good("J3"),
    ]
    .join("\n");
    std::fs::write(&input, text).unwrap();
    let output = dir.path().join("out.jsonl");

    let summary = run_issue(&args(&server, &pki, &input, &output)).unwrap();
    assert_eq!((summary.sent, summary.issued, summary.failed), (3, 3, 0));
    assert_eq!(
        summary.bad_input.iter().map(|b| b.line).collect::<Vec<_>>(),
        [2, 4]
    );
    let lines = read_output(&output);
    assert_eq!(lines.len(), 3);
    for (line, (order, input_line)) in lines.iter().zip([("J1", 1), ("J2", 3), ("J3", 6)]) {
        assert_eq!(line["order_id"], order);
        assert_eq!(line["seller"], SELLER);
        assert_eq!(line["line"], input_line);
        assert_eq!(line["status"], "issued");
        assert_eq!(line["replayed"], false);
        let invoice = server.invoice_of(order).unwrap();
        assert_eq!(line["code"], format!("{:012}", invoice.identity.code.get()));
        assert_eq!(
            line["number"],
            format!("{:08}", invoice.identity.number.get())
        );
        assert_eq!(line["code"].as_str().unwrap().len(), 12);
        assert_eq!(line["tax_control_code"].as_str().unwrap().len(), 64);
        assert_eq!(line["check_code"].as_str().unwrap().len(), 20);
    }
    // Amounts were computed: 2 × 125.00 at 9% → tax 22.50.
    let issued = server.state.issued.lock().unwrap();
    let (request, _) = &issued[&(SELLER.to_owned(), "J1".to_owned())];
    assert_eq!(
        (request.amount_fen, request.tax_fen, request.total_fen),
        (25_000, 2_250, 27_250)
    );
    drop(issued);

    // Running the same file again issues nothing new: every invoice comes back replayed.
    let rerun = run_issue(&args(&server, &pki, &input, &output)).unwrap();
    assert_eq!((rerun.replayed, rerun.issued), (3, 0));
    let again = read_output(&output);
    for (first, second) in lines.iter().zip(&again) {
        assert_eq!(second["status"], "replayed");
        assert_eq!(first["number"], second["number"]);
    }
}

#[test]
fn csv_round_trip_groups_line_items() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(&dir.path().join("pki"), &[], &["ticketing"]).unwrap();
    let server = MockServer::start(&pki, 4096);
    let input = dir.path().join("orders.csv");
    std::fs::write(
        &input,
        format!(
            "seller,order_id,buyer_name,tax_rate_bp,issuer_ref,line_name,quantity,unit_price_fen\n\
             {SELLER},C1,Wang Wu,600,K7,meal,2,3000\n\
             {SELLER},C1,,,,drink,1,800\n\
             {SELLER},C2,Wang Wu,600,K7,meal,zero,3000\n\
             {SELLER},C3,Zhao Liu,600,K7,meal,1,3000\n"
        ),
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let mut args = args(&server, &pki, &input, &output);
    args.no_shard_aware = true;
    let summary = run_issue(&args).unwrap();
    assert_eq!((summary.sent, summary.issued), (2, 2));
    assert_eq!(summary.bad_input.len(), 1);
    assert_eq!(summary.bad_input[0].line, 4);
    let lines = read_output(&output);
    assert_eq!(
        lines
            .iter()
            .map(|l| l["order_id"].clone())
            .collect::<Vec<_>>(),
        ["C1", "C3"]
    );
    let issued = server.state.issued.lock().unwrap();
    let (c1, _) = &issued[&(SELLER.to_owned(), "C1".to_owned())];
    assert_eq!(c1.lines.len(), 2);
    assert_eq!((c1.amount_fen, c1.tax_fen), (6_800, 408));
}
