//! `scripts/check-policies` (run by `scripts/sam-check`) on `template.yaml` as shipped, and on
//! copies with one rule broken each: a role granted an action its code never calls, a function
//! that runs extension code may read the chat token, or someone other than intake, worker and
//! sweeper may send work. Each copy must fail
//! with the finding that names it.

use std::path::Path;
use std::process::Command;

use longrun_tests::{scratch_dir, skip_or_fail, workspace_root};

/// Runs the checker on `template`: its exit status and what it printed.
fn check(template: &Path) -> Option<(bool, String)> {
    let script = workspace_root().join("scripts/check-policies");
    let output = match Command::new("python3").arg(&script).arg(template).output() {
        Ok(output) => output,
        Err(e) => {
            skip_or_fail(&format!("python3 ({e})"));
            return None;
        }
    };
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    if text.contains("No module named 'yaml'") {
        skip_or_fail("PyYAML (installed with aws-sam-cli)");
        return None;
    }
    Some((output.status.success(), text))
}

/// The shipped template with `from` replaced by `to` once (the first place it occurs).
fn broken(from: &str, to: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(workspace_root().join("template.yaml")).unwrap();
    assert!(
        text.contains(from),
        "template.yaml no longer holds {from:?}"
    );
    let dir = scratch_dir("policies");
    let path = dir.join("template.yaml");
    std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    path
}

#[test]
fn the_shipped_template_passes() {
    let Some((ok, text)) = check(&workspace_root().join("template.yaml")) else {
        return;
    };
    assert!(ok, "{text}");
}

#[test]
fn each_broken_rule_is_reported() {
    const SENDERS: &str =
        "[!GetAtt IntakeRole.Arn, !GetAtt WorkerRole.Arn, !GetAtt SweeperRole.Arn]";
    let cases = [
        (
            // Intake (the first role with a secrets grant) loses its deny of the chat token.
            "- Sid: NoChatToken\n                Effect: Deny",
            "- Sid: NoChatToken\n                Effect: Allow",
            "IntakeRole: may read secrets but does not deny the chat token secret",
        ),
        (
            // A grant no code uses (transactions here are Puts only).
            "                  - dynamodb:PutItem\n",
            "                  - dynamodb:PutItem\n                  - dynamodb:ConditionCheckItem\n",
            "IntakeRole: granted dynamodb:conditioncheckitem, which its code never calls",
        ),
        (
            "secret:${SecretsPrefix}/*",
            "secret:${ChatTokenSecretName}-??????",
            "IntakeRole: allowed to read the chat token secret",
        ),
        (
            "Queues: [!Ref WorkQueue]",
            "Queues: [!Ref DeliveryQueue]",
            "WorkQueue: no queue policy denies sqs:SendMessage",
        ),
        (
            SENDERS,
            "[!GetAtt IntakeRole.Arn, !GetAtt WorkerRole.Arn, !GetAtt SweeperRole.Arn, !GetAtt DeliveryRole.Arn]",
            "WorkQueuePolicy: the senders it lets through",
        ),
        (
            "Resource: !GetAtt DeliveryDlq.Arn\n",
            "Resource: [!GetAtt DeliveryDlq.Arn, !GetAtt WorkQueue.Arn]\n",
            "DeliveryRole: allowed to send to the work queue",
        ),
    ];
    for (from, to, finding) in cases {
        let Some((ok, text)) = check(&broken(from, to)) else {
            return;
        };
        assert!(!ok, "{from:?} -> {to:?} passed:\n{text}");
        assert!(
            text.contains(finding),
            "{from:?} -> {to:?}: expected {finding:?} in:\n{text}"
        );
    }
}

#[test]
fn the_templates_indexes_project_what_the_adapter_reads() {
    // The by-user index of the deployed table holds what the adapter's own table creation
    // gives it (a list reads nothing else); by-lease holds keys only.
    let template = std::fs::read_to_string(workspace_root().join("template.yaml")).unwrap();
    let by_user = &template[template.find("IndexName: by-user").expect("by-user")..];
    let line = by_user
        .lines()
        .find_map(|l| l.trim().strip_prefix("NonKeyAttributes: ["))
        .and_then(|l| l.strip_suffix(']'))
        .expect("by-user's NonKeyAttributes");
    let projected: Vec<&str> = line.split(',').map(str::trim).collect();
    assert_eq!(projected, longrun_aws::dynamodb::BY_USER_ATTRIBUTES);
    let by_lease = &template[template.find("IndexName: by-lease").expect("by-lease")..];
    let projection = by_lease
        .lines()
        .find(|l| l.contains("ProjectionType"))
        .unwrap();
    assert!(projection.contains("KEYS_ONLY"), "{projection}");
}
