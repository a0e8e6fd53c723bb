//! `longrun new NAME`: a standalone extension project of the author's own, outside this
//! repository, with its own workspace — the extension (one function per pattern, one job, one
//! long-running function in steps), its Lambda `main`, a dev entry point, tests on
//! `longrun::testing`, `template.yaml`, `samconfig.toml`, `events/`, a README and a
//! `.gitignore`. longrun is not on the crate registry: the project depends on it by path (the
//! checkout this `longrun` was built from, or `--longrun-path`) or by git (`--longrun-git`).

use std::path::{Path, PathBuf};

use clap::Args;
use longrun::{ActionType, ToolSpec};
use serde_json::json;

use crate::cli::Failure;

/// `longrun new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The extension's name: lowercase letters, digits and dashes, starting with a letter
    /// (the `ext` of every request, the package and the Lambda binary).
    pub name: String,
    /// The project folder to create [default: ./NAME].
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// The longrun checkout to depend on by path [default: the one this `longrun` was built
    /// from].
    #[arg(long, conflicts_with = "longrun_git", value_name = "DIR")]
    pub longrun_path: Option<PathBuf>,
    /// Depend on longrun by git instead (a repository URL).
    #[arg(long, value_name = "URL")]
    pub longrun_git: Option<String>,
    /// With --longrun-git: the branch, tag or commit.
    #[arg(long, requires = "longrun_git", value_name = "REV")]
    pub longrun_rev: Option<String>,
}

/// The checkout this binary was built from (`cli/..`).
fn built_from() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Where the project takes longrun's crates from.
enum Source {
    Path(PathBuf),
    Git { url: String, rev: Option<String> },
}

impl Source {
    /// The dependency table of the crate `package` (`longrun`, `longrun-lambda`, …).
    fn dependency(&self, package: &str, features: &[&str]) -> String {
        let features = if features.is_empty() {
            String::new()
        } else {
            format!(
                ", features = [{}]",
                features
                    .iter()
                    .map(|f| format!("\"{f}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        match self {
            Self::Path(root) => {
                let path = root.join("shared").join(package);
                format!(
                    "{{ path = {}{features} }}",
                    toml_string(&path.to_string_lossy())
                )
            }
            Self::Git { url, rev } => {
                let rev = rev
                    .as_ref()
                    .map(|r| format!(", rev = {}", toml_string(r)))
                    .unwrap_or_default();
                format!("{{ git = {}{rev}{features} }}", toml_string(url))
            }
        }
    }

    fn home(&self) -> String {
        match self {
            Self::Path(root) => root.display().to_string(),
            Self::Git { url, .. } => url.clone(),
        }
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// Checks an extension name: what DynamoDB keys, package names and Lambda names all accept.
pub fn check_name(name: &str) -> Result<(), Failure> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        return Err(Failure::Usage(format!(
            "{name:?} is not a valid extension name: use 1–64 lowercase letters, digits and dashes, starting with a letter (e.g. text-tools)"
        )));
    }
    if ["test", "dev", "longrun", "self", "crate", "super"].contains(&name) {
        return Err(Failure::Usage(format!(
            "{name:?} is reserved; choose another name"
        )));
    }
    Ok(())
}

/// The project's files, as (path in the project, template text).
const FILES: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../templates/project/Cargo.toml"),
    ),
    (
        "src/lib.rs",
        include_str!("../templates/project/src/lib.rs"),
    ),
    (
        "src/main.rs",
        include_str!("../templates/project/src/main.rs"),
    ),
    (
        "dev/Cargo.toml",
        include_str!("../templates/project/dev/Cargo.toml"),
    ),
    (
        "dev/src/main.rs",
        include_str!("../templates/project/dev/src/main.rs"),
    ),
    (
        "tests/extension.rs",
        include_str!("../templates/project/tests/extension.rs"),
    ),
    ("README.md", include_str!("../templates/project/README.md")),
    (".gitignore", include_str!("../templates/project/gitignore")),
];

/// The reference deployment's SAM template and configuration: the project gets the same
/// ones, naming its own binary and stack.
const TEMPLATE: &str = include_str!("../../template.yaml");
const SAMCONFIG: &str = include_str!("../../samconfig.toml");
/// The binary the reference template names.
const REFERENCE_BINARY: &str = "Binary: text-tools";

/// The functions the scaffold's `src/lib.rs` registers, for its sample events (the project
/// regenerates them from the code with `cargo run --bin dev -- --write-events events`).
fn scaffold_tools() -> Vec<ToolSpec> {
    const EXAMPLE: &str = "Long AI calls should never block a chat: acknowledge at once, show progress, allow a cancel, and deliver the answer as a fresh message.";
    let tool = |name: &str, event: &str, background: bool, long_running: bool, example| ToolSpec {
        name: name.to_owned(),
        description: String::new(),
        action_type: ActionType::default(),
        event: Some(event.to_owned()),
        background,
        long_running,
        parameters: serde_json::Value::Null,
        examples: vec![example],
    };
    vec![
        tool(
            "start_summary",
            "summary_started",
            false,
            false,
            json!({"input": EXAMPLE, "quick": false}),
        ),
        tool(
            "summarize",
            "text_summarized",
            false,
            false,
            json!({"input": EXAMPLE}),
        ),
        tool(
            "summarize_document",
            "document_summarized",
            true,
            true,
            json!({"document": format!("{EXAMPLE}\n\n{EXAMPLE}")}),
        ),
        tool(
            "summarize_later",
            "text_summarized",
            true,
            false,
            json!({"input": EXAMPLE}),
        ),
    ]
}

/// `longrun new`.
pub fn run(args: NewArgs) -> Result<(), Failure> {
    check_name(&args.name)?;
    let source = match (&args.longrun_path, &args.longrun_git) {
        (_, Some(url)) => Source::Git {
            url: url.clone(),
            rev: args.longrun_rev.clone(),
        },
        (Some(path), None) => Source::Path(path.clone()),
        (None, None) => Source::Path(built_from()),
    };
    if let Source::Path(root) = &source
        && !root.join("shared/longrun/Cargo.toml").is_file()
    {
        return Err(Failure::Config(format!(
            "{} is not a longrun checkout (no shared/longrun/Cargo.toml); pass --longrun-path DIR or --longrun-git URL",
            root.display()
        )));
    }
    let source = match source {
        Source::Path(root) => Source::Path(
            std::fs::canonicalize(&root)
                .map_err(|e| Failure::Config(format!("{}: {e}", root.display())))?,
        ),
        git => git,
    };
    let dir = args
        .path
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    if dir.exists()
        && std::fs::read_dir(&dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Failure::Conflict(format!(
            "{} already exists and is not empty; choose another --path",
            dir.display()
        )));
    }
    let written = scaffold(&args.name, &source, &dir)?;
    println!(
        "Created {} ({} files): the {} extension, depending on longrun at {}\n",
        dir.display(),
        written,
        args.name,
        source.home()
    );
    println!("Next:\n  cd {}", dir.display());
    println!(
        "  cargo run --release --bin dev -- --simulate-model   # the pipeline and a chat page, offline"
    );
    println!("  cargo test                                           # the extension's tests");
    println!(
        "  sam build --beta-features && sam deploy --guided     # to AWS (README.md, \"Deploy\")"
    );
    Ok(())
}

/// Writes the project into `dir`; returns how many files it wrote.
fn scaffold(name: &str, source: &Source, dir: &Path) -> Result<usize, Failure> {
    let krate = name.replace('-', "_");
    let fill = |text: &str| {
        text.replace(
            "__LONGRUN_LAMBDA__",
            &source.dependency("longrun-lambda", &[]),
        )
        .replace("__LONGRUN_DEV__", &source.dependency("longrun-dev", &[]))
        .replace(
            "__LONGRUN_TESTING__",
            &source.dependency("longrun", &["testing"]),
        )
        .replace("__LONGRUN_HOME__", env!("CARGO_PKG_REPOSITORY"))
        .replace("__LONGRUN__", &source.dependency("longrun", &[]))
        .replace("__CRATE__", &krate)
        .replace("__NAME__", name)
    };
    let mut files: Vec<(PathBuf, String)> = FILES
        .iter()
        .map(|(path, text)| (PathBuf::from(path), fill(text)))
        .collect();
    files.push((
        "template.yaml".into(),
        TEMPLATE.replace(REFERENCE_BINARY, &format!("Binary: {name}")),
    ));
    files.push((
        "samconfig.toml".into(),
        SAMCONFIG.replace("\"longrun\"", &format!("\"{name}\"")),
    ));
    // The checkout's lock file: the project resolves to the versions longrun is tested with,
    // and builds offline from the local crate cache.
    if let Source::Path(root) = source
        && let Ok(lock) = std::fs::read_to_string(root.join("Cargo.lock"))
    {
        files.push(("Cargo.lock".into(), lock));
    }
    for (path, text) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| Failure::Other(format!("{}: {e}", parent.display())))?;
        }
        std::fs::write(&path, text)
            .map_err(|e| Failure::Other(format!("{}: {e}", path.display())))?;
    }
    // The sample events as the project's dev binary writes them (`--write-events events`).
    let events = longrun_dev::events::write_samples(
        longrun_dev::events::samples_for(name, &scaffold_tools()),
        &dir.join("events"),
    )?;
    Ok(files.len() + events.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["probe", "text-tools", "a1"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Probe",
            "1x",
            "x_y",
            "x-",
            "dev",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_placeholder_is_filled() {
        let dir = std::env::temp_dir().join(format!("longrun-new-{}", ulid::Ulid::new()));
        let source = Source::Path(built_from());
        scaffold("my-ext", &source, &dir).unwrap();
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        assert!(manifest.contains("name = \"my-ext\""));
        assert!(manifest.contains("shared/longrun-lambda"));
        let template = std::fs::read_to_string(dir.join("template.yaml")).unwrap();
        assert!(template.contains("Binary: my-ext") && !template.contains("text-tools"));
        for entry in walk(&dir) {
            let text = std::fs::read_to_string(&entry).unwrap_or_default();
            for placeholder in ["__NAME__", "__CRATE__", "__LONGRUN"] {
                assert!(
                    !text.contains(placeholder),
                    "{} keeps {placeholder}",
                    entry.display()
                );
            }
        }
        assert!(
            dir.join("events/intake-call-summarize_later.json")
                .is_file()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dependencies_point_at_the_checkout_or_the_repository() {
        let path = Source::Path(PathBuf::from("/src/longrun"));
        assert_eq!(
            path.dependency("longrun", &["testing"]),
            r#"{ path = "/src/longrun/shared/longrun", features = ["testing"] }"#
        );
        let git = Source::Git {
            url: "https://example.com/longrun.git".into(),
            rev: Some("v0.1".into()),
        };
        assert_eq!(
            git.dependency("longrun-lambda", &[]),
            r#"{ git = "https://example.com/longrun.git", rev = "v0.1" }"#
        );
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }
}
