//! The SDK's shape, as an extension author depends on it: the crate `longrun` pulls no AWS SDK,
//! no Lambda runtime and no log subscriber (`cargo tree -p longrun -e normal`), so an author who
//! only writes and unit-tests handlers compiles none of them; and the reference deployment's
//! `main`s are the one-line entry points an author writes too.

use std::process::Command;

fn cargo_tree(package: &str) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        .current_dir(longrun_tests::workspace_root())
        .args([
            "tree", "-p", package, "-e", "normal", "--prefix", "none", "--locked",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn crates(tree: &str) -> Vec<&str> {
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect()
}

#[test]
fn the_author_facing_crate_pulls_no_aws_sdk_lambda_runtime_or_subscriber() {
    let tree = cargo_tree("longrun");
    let names = crates(&tree);
    assert!(
        names.contains(&"longrun") && names.contains(&"reqwest"),
        "{tree}"
    );
    for name in names {
        assert!(
            !name.starts_with("aws-sdk-")
                && !name.starts_with("aws-config")
                && !name.starts_with("aws-smithy")
                && name != "lambda_runtime"
                && name != "aws_lambda_events"
                && name != "tracing-subscriber"
                && name != "dynoxide-rs",
            "longrun depends on {name}:\n{tree}"
        );
    }
}

#[test]
fn the_adapters_and_the_lambda_glue_are_where_the_aws_crates_are() {
    let aws = cargo_tree("longrun-aws");
    assert!(crates(&aws).contains(&"aws-sdk-dynamodb"));
    assert!(!crates(&aws).contains(&"lambda_runtime"));
    let lambda = cargo_tree("longrun-lambda");
    assert!(crates(&lambda).contains(&"lambda_runtime"));
    assert!(
        !crates(&lambda).contains(&"dynoxide-rs"),
        "the Lambda binary links no emulator"
    );
}

#[test]
fn a_functions_main_is_the_one_call_an_author_writes() {
    let root = longrun_tests::workspace_root();
    for (path, call) in [
        (
            "functions/text-tools/src/main.rs",
            "longrun_lambda::run(text_tools::extension()).await",
        ),
        (
            "functions/dev/src/main.rs",
            "longrun_dev::main(text_tools::extension_at).await",
        ),
    ] {
        let text = std::fs::read_to_string(root.join(path)).unwrap();
        let code: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .collect();
        assert!(code.contains(&call), "{path}: {code:?}");
        assert!(
            code.len() <= 5,
            "{path} is more than its entry point: {code:?}"
        );
    }
}

#[test]
fn the_shipped_sample_events_are_what_the_extension_declares() {
    // `cargo run --bin dev -- --write-events events` writes them; this keeps them in step.
    let dir = longrun_tests::workspace_root().join("events");
    let samples = longrun_dev::events::samples(&text_tools::extension());
    let mut shipped: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    shipped.sort();
    let mut expected: Vec<String> = samples.iter().map(|(name, _)| name.clone()).collect();
    expected.sort();
    assert_eq!(shipped, expected);
    for (name, event) in samples {
        let text = std::fs::read_to_string(dir.join(&name)).unwrap();
        let on_disk: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            on_disk, event,
            "events/{name} differs from the extension's examples"
        );
    }
}
