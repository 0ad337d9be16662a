//! How the JVM pool adapter (`adapters/java`) is built: one recipe for
//! `cargo xtask setup`, which installs what it needs and builds it, and the
//! integration tests, which build it again from the current source.
//!
//! Maven Central is not reachable from the machines this project builds
//! on, so the build is plain `javac` and `jar` against the jars Debian
//! installs in `/usr/share/java` (HikariCP 2.7.9, pgjdbc, MariaDB
//! Connector/J, SLF4J). `adapters/java/pom.xml` is for Maven users and is
//! not used here.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

/// Debian packages the build and the tests need: a JDK (javac, jar) and
/// the pool and drivers the adapter is tested with.
pub const DEBS: &[&str] = &[
    "openjdk-17-jdk-headless",
    "libhikaricp-java",
    "libpostgresql-jdbc-java",
    "libmariadb-java",
    "libslf4j-java",
];

/// Where Debian puts its jars.
pub const DEBIAN_JAVA_DIR: &str = "/usr/share/java";

/// The jars the adapter compiles against (HikariCP and its logging API).
pub const COMPILE_JARS: &[&str] = &["HikariCP.jar", "slf4j-api.jar"];

/// The jars the test application runs with besides the adapter's: the
/// pool, its logging (to stderr), and both drivers.
pub const RUNTIME_JARS: &[&str] = &[
    "HikariCP.jar",
    "slf4j-api.jar",
    "slf4j-simple.jar",
    "postgresql.jar",
    "mariadb-java-client.jar",
];

/// The adapter's unit tests' main class (adapters/java/src/test/java).
pub const UNIT_TESTS_MAIN: &str = "io.poolscope.adapter.AdapterTests";
/// The test application's main class (adapters/java/testapp).
pub const TESTAPP_MAIN: &str = "io.poolscope.testapp.PoolApp";

/// What [`build`] made, all under its output directory.
#[derive(Debug, Clone)]
pub struct Built {
    /// `poolscope-adapter.jar`: the adapter, what an application puts on
    /// its class path.
    pub adapter_jar: PathBuf,
    /// `poolscope-adapter-testapp.jar`: the integration tests' application.
    pub testapp_jar: PathBuf,
    /// The compiled unit tests (a class directory).
    pub unit_test_classes: PathBuf,
}

impl Built {
    /// The test application's class path: both jars and Debian's.
    pub fn testapp_classpath(&self) -> String {
        let mut parts = vec![path_text(&self.testapp_jar), path_text(&self.adapter_jar)];
        parts.extend(debian_jars(RUNTIME_JARS));
        parts.join(":")
    }

    /// The unit tests' class path.
    pub fn unit_test_classpath(&self) -> String {
        let mut parts = vec![
            path_text(&self.unit_test_classes),
            path_text(&self.adapter_jar),
        ];
        parts.extend(debian_jars(COMPILE_JARS));
        parts.join(":")
    }
}

/// Debian packages of [`DEBS`] whose files are missing, for a message
/// that says what to install.
pub fn missing() -> Vec<String> {
    let mut missing = Vec::new();
    for tool in ["javac", "jar", "java"] {
        if Command::new(tool).arg("--version").output().is_err() {
            missing.push(format!("{tool} (openjdk-17-jdk-headless)"));
        }
    }
    for (jar, deb) in [
        ("HikariCP.jar", "libhikaricp-java"),
        ("postgresql.jar", "libpostgresql-jdbc-java"),
        ("mariadb-java-client.jar", "libmariadb-java"),
        ("slf4j-api.jar", "libslf4j-java"),
        ("slf4j-simple.jar", "libslf4j-java"),
    ] {
        if !Path::new(DEBIAN_JAVA_DIR).join(jar).is_file() {
            missing.push(format!("{DEBIAN_JAVA_DIR}/{jar} ({deb})"));
        }
    }
    missing
}

/// Compiles the adapter, its unit tests and the test application from
/// `root/adapters/java` into `out` (e.g. `target/java`), warnings as
/// errors. Each jar is written beside its final name and renamed into
/// place, so a reader never sees half a jar.
pub fn build(root: &Path, out: &Path) -> Result<Built, String> {
    let src = root.join("adapters").join("java");
    let staging = out.join(format!("staging-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let result = build_in(&src, out, &staging);
    let _ = fs::remove_dir_all(&staging);
    result
}

fn build_in(src: &Path, out: &Path, staging: &Path) -> Result<Built, String> {
    let classes = staging.join("adapter");
    let compile_cp = debian_jars(COMPILE_JARS).join(":");
    javac(&classes, &compile_cp, &sources(&src.join("src/main/java"))?)?;
    let adapter_jar = staging.join("poolscope-adapter.jar");
    jar(&adapter_jar, &classes)?;

    let tests = staging.join("unit-tests");
    let tests_cp = format!("{}:{compile_cp}", path_text(&classes));
    javac(&tests, &tests_cp, &sources(&src.join("src/test/java"))?)?;

    let app = staging.join("testapp");
    let app_cp = format!("{}:{compile_cp}", path_text(&classes));
    javac(&app, &app_cp, &sources(&src.join("testapp/src"))?)?;
    let testapp_jar = staging.join("poolscope-adapter-testapp.jar");
    jar(&testapp_jar, &app)?;

    fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let built = Built {
        adapter_jar: out.join("poolscope-adapter.jar"),
        testapp_jar: out.join("poolscope-adapter-testapp.jar"),
        unit_test_classes: out.join("unit-tests"),
    };
    let _ = fs::remove_dir_all(&built.unit_test_classes);
    for (from, to) in [
        (&adapter_jar, &built.adapter_jar),
        (&testapp_jar, &built.testapp_jar),
        (&tests, &built.unit_test_classes),
    ] {
        fs::rename(from, to)
            .map_err(|e| format!("cannot move {} to {}: {e}", from.display(), to.display()))?;
    }
    Ok(built)
}

/// The `.java` files under `dir`, sorted.
fn sources(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries = fs::read_dir(&d).map_err(|e| format!("cannot read {}: {e}", d.display()))?;
        for entry in entries {
            let path = entry
                .map_err(|e| format!("cannot read {}: {e}", d.display()))?
                .path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|x| x == "java") {
                found.push(path);
            }
        }
    }
    if found.is_empty() {
        return Err(format!("no .java files under {}", dir.display()));
    }
    found.sort();
    Ok(found)
}

fn javac(classes: &Path, classpath: &str, sources: &[PathBuf]) -> Result<(), String> {
    fs::create_dir_all(classes).map_err(|e| format!("cannot create {}: {e}", classes.display()))?;
    let mut cmd = Command::new("javac");
    cmd.args([
        "--release",
        "17",
        "-encoding",
        "UTF-8",
        "-Xlint:all",
        "-Werror",
    ])
    .arg("-d")
    .arg(classes)
    .arg("-cp")
    .arg(classpath)
    .args(sources);
    run(&mut cmd)
}

fn jar(file: &Path, classes: &Path) -> Result<(), String> {
    let mut cmd = Command::new("jar");
    cmd.arg("--create")
        .arg("--file")
        .arg(file)
        .arg("-C")
        .arg(classes)
        .arg(".");
    run(&mut cmd)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {program} ({e}); install {}", DEBS.join(" ")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

fn debian_jars(names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| format!("{DEBIAN_JAVA_DIR}/{n}"))
        .collect()
}

fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
