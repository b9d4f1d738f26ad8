//! The `emu` part of moe-kernels' build script (included by `../build.rs`): compiles every `cuda/*.cu` (and the
//! test-only `emu/test_kernels.cu`) as C++ for the CPU, with `emu/emu.h` force-included, into one static library
//! with the emulator runtime. The `.cu` files are not modified: each is included by a generated translation unit
//! that lists its `extern "C" __global__` entry points (found by preprocessing the file with `MOE_EMU_SCAN`) in a
//! table the runtime launches by name. What that unit includes is a copy of the file in which each `__shared__`
//! declaration (one per line, at function scope, as every kernel writes them) becomes a reference to memory that
//! ends at a guard page ([`guard_shared`]), line for line, so an access past a shared array's end faults and is
//! reported with the array's name and line.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One entry point: its name and `__launch_bounds__` (0 when none).
struct Entry {
    name: String,
    bounds: u32,
}

/// Registers per block on sm_80, sm_89 and sm_90, and the granule a warp's registers are allocated in.
const REGS_PER_BLOCK: u32 = 65536;
const WARP_REG_GRANULE: u32 = 256;

/// Per entry point, from README.md's ptxas table (`kernels/tools/resource-usage.sh`, which CI checks against
/// the sources): the most registers per thread over the architectures listed, the one that needs them, and
/// the largest block those registers leave room for. A bigger launch is refused by the GPU ("too many
/// resources requested for launch"), so the emulator refuses it too. Empty when the README or its table is
/// missing.
fn register_limits(readme: &Path) -> Vec<(String, u32, String, u32)> {
    let Ok(text) = fs::read_to_string(readme) else {
        return Vec::new();
    };
    let table = text
        .split("<!-- ptxas:begin -->")
        .nth(1)
        .and_then(|t| t.split("<!-- ptxas:end -->").next())
        .unwrap_or("");
    let mut most: Vec<(String, u32, String, u32)> = Vec::new();
    for line in table.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // ["", `name`, arch, registers, ...]
        let (Some(name), Some(arch), Some(Ok(regs))) = (
            cells
                .get(1)
                .and_then(|c| c.strip_prefix('`')?.strip_suffix('`')),
            cells.get(2),
            cells.get(3).map(|r| r.parse::<u32>()),
        ) else {
            continue;
        };
        let per_warp = (regs.max(1) * 32).div_ceil(WARP_REG_GRANULE) * WARP_REG_GRANULE;
        let threads = (REGS_PER_BLOCK / per_warp * 32).min(1024);
        match most.iter_mut().find(|m| m.0 == name) {
            Some(m) if m.1 >= regs => {}
            Some(m) => *m = (name.to_string(), regs, arch.to_string(), threads),
            None => most.push((name.to_string(), regs, arch.to_string(), threads)),
        }
    }
    most
}

pub fn build(manifest_dir: &Path, out_dir: &Path) -> Result<(), String> {
    let emu_dir = manifest_dir.join("emu");
    let cuda_dir = manifest_dir.join("cuda");
    println!("cargo:rerun-if-changed={}", emu_dir.display());
    for f in [
        "emu.h",
        "entry.h",
        "internal.h",
        "runtime.cpp",
        "buffers.cpp",
        "test_kernels.cu",
        "build.rs",
    ] {
        println!("cargo:rerun-if-changed={}", emu_dir.join(f).display());
    }
    for f in ["cuda_fp16.h", "cuda_bf16.h", "mma.h"] {
        println!(
            "cargo:rerun-if-changed={}",
            emu_dir.join("include").join(f).display()
        );
    }
    let mut sources: Vec<PathBuf> = fs::read_dir(&cuda_dir)
        .map_err(|e| format!("cannot read {}: {e}", cuda_dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    sources.retain(|p| p.extension().is_some_and(|x| x == "cu"));
    sources.push(emu_dir.join("test_kernels.cu"));

    let mut base = cc::Build::new();
    base.cpp(true)
        .std("c++17")
        .opt_level(2)
        .debug(false)
        // CPU results must not depend on FMA contraction: the kernels say where they want an FMA (fmaf).
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-U_FORTIFY_SOURCE")
        // Every typed access checks its alignment (runtime.cpp's handler reports it): the GPU faults on a
        // misaligned vector access to global, shared or local memory alike.
        .flag("-fsanitize=alignment")
        .flag("-include")
        .flag(emu_dir.join("emu.h").to_str().ok_or("non-UTF-8 path")?)
        .include(emu_dir.join("include"))
        .include(&emu_dir)
        .include(&cuda_dir)
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unused-variable")
        .flag_if_supported("-Wno-unused-function")
        .warnings(false);
    let compiler = base.get_compiler();
    let readme = manifest_dir.join("..").join("README.md");
    println!("cargo:rerun-if-changed={}", readme.display());
    let limits = register_limits(&readme);

    let mut tables = String::new();
    let mut units = Vec::new();
    for src in &sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: bad file name", src.display()))?;
        let entries = scan(&compiler, &emu_dir, &cuda_dir, src)?;
        if entries.is_empty() {
            return Err(format!(
                "{}: no extern \"C\" __global__ entry point found",
                src.display()
            ));
        }
        // The source with its `__shared__` declarations guarded (same lines, `#line` back to the file).
        let text =
            fs::read_to_string(src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        let guarded = out_dir.join(format!("emu_src_{stem}.cu"));
        let body = format!(
            "#line 1 {:?}\n{}",
            src.display().to_string(),
            guard_shared(&text, src)?
        );
        fs::write(&guarded, body)
            .map_err(|e| format!("cannot write {}: {e}", guarded.display()))?;
        let mut tu = format!(
            "// @generated by moe-kernels/emu/build.rs: {} compiled for the CPU emulator.\n#include {:?}\n#include \"entry.h\"\n",
            src.display(),
            guarded.display().to_string()
        );
        writeln!(
            tu,
            "extern const ::moe_emu::Entry moe_emu_table_{stem}[] = {{"
        )
        .unwrap();
        for e in &entries {
            let (regs, arch, threads) = limits
                .iter()
                .find(|l| l.0 == e.name)
                .map_or((0, "", 0), |l| (l.1, l.2.as_str(), l.3));
            writeln!(
                tu,
                "    MOE_EMU_ENTRY({}, {}, {threads}, {regs}, {arch:?}),",
                e.name, e.bounds
            )
            .unwrap();
        }
        writeln!(
            tu,
            "}};\nextern const unsigned moe_emu_count_{stem} = {};",
            entries.len()
        )
        .unwrap();
        let path = out_dir.join(format!("emu_{stem}.cpp"));
        fs::write(&path, tu).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        units.push(path);
        writeln!(
            tables,
            "extern const ::moe_emu::Entry moe_emu_table_{stem}[];\nextern const unsigned moe_emu_count_{stem};"
        )
        .unwrap();
    }
    let mut registry = String::from(
        "// @generated by moe-kernels/emu/build.rs: every emulated entry point, by name.\n#include <cstring>\n#include \"entry.h\"\n",
    );
    registry.push_str(&tables);
    registry.push_str("namespace moe_emu {\nconst Entry* find_entry(const char* name) {\n");
    for src in &sources {
        let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        writeln!(
            registry,
            "  for (unsigned i = 0; i < moe_emu_count_{stem}; ++i)\n    if (std::strcmp(moe_emu_table_{stem}[i].name, name) == 0) return &moe_emu_table_{stem}[i];"
        )
        .unwrap();
    }
    registry.push_str("  return nullptr;\n}\n}  // namespace moe_emu\n");
    let reg = out_dir.join("emu_registry.cpp");
    fs::write(&reg, registry).map_err(|e| format!("cannot write {}: {e}", reg.display()))?;

    base.files(&units)
        .file(&reg)
        .file(emu_dir.join("runtime.cpp"))
        .file(emu_dir.join("buffers.cpp"))
        .try_compile("moe_kernels_emu")
        .map_err(|e| format!("compiling the kernels for the CPU emulator failed: {e}"))?;
    Ok(())
}

/// The entry points of `src`: preprocess it with `MOE_EMU_SCAN`, where `__global__` reads `MOE_EMU_GLOBAL` and
/// `__launch_bounds__(n)` reads `MOE_EMU_BOUNDS(n)`, and take the name after each `MOE_EMU_GLOBAL void`.
fn scan(
    compiler: &cc::Tool,
    emu_dir: &Path,
    cuda_dir: &Path,
    src: &Path,
) -> Result<Vec<Entry>, String> {
    let out = Command::new(compiler.path())
        .args(["-x", "c++", "-std=c++17", "-E", "-P", "-DMOE_EMU_SCAN", "-include"])
        .arg(emu_dir.join("emu.h"))
        .arg("-I")
        .arg(emu_dir.join("include"))
        .arg("-I")
        .arg(cuda_dir)
        .arg(src)
        .output()
        .map_err(|e| format!("cannot run the C++ compiler {} ({e}); the `emu` feature needs g++ (Debian: apt-get install g++)", compiler.path().display()))?;
    if !out.status.success() {
        return Err(format!(
            "preprocessing {} failed:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut entries = Vec::new();
    for chunk in text.split("MOE_EMU_GLOBAL").skip(1) {
        let rest = chunk.trim_start();
        let Some(rest) = rest.strip_prefix("void") else {
            return Err(format!(
                "{}: a __global__ function must return void",
                src.display()
            ));
        };
        let mut rest = rest.trim_start();
        let mut bounds = 0;
        if let Some(b) = rest.strip_prefix("MOE_EMU_BOUNDS") {
            let open = b.find('(').ok_or("malformed __launch_bounds__")?;
            let close = b.find(')').ok_or("malformed __launch_bounds__")?;
            let expr = &b[open + 1..close];
            let first = expr.split(',').next().unwrap_or("").trim();
            bounds = eval_bounds(first).ok_or_else(|| {
                format!("{}: cannot read __launch_bounds__({expr})", src.display())
            })?;
            rest = b[close + 1..].trim_start();
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            return Err(format!(
                "{}: cannot read an entry point's name",
                src.display()
            ));
        }
        entries.push(Entry { name, bounds });
    }
    Ok(entries)
}

/// `256`, `32 * 8`, `8 * 32`, `(32 * 8)`: the launch-bounds expressions the kernels use after preprocessing.
fn eval_bounds(expr: &str) -> Option<u32> {
    let e = expr.trim().trim_start_matches('(').trim_end_matches(')');
    e.split('*')
        .map(|f| {
            f.trim()
                .trim_matches(|c| c == '(' || c == ')')
                .trim()
                .parse::<u32>()
                .ok()
        })
        .try_fold(1u32, |acc, v| v.map(|v| acc * v))
}

/// `text` (the source `src`) with every `__shared__` declaration, `__shared__ [__align__(N)] TYPE NAME[D1][D2]...;`
/// on one line, replaced on that same line by a function-local reference to guarded memory of the same type:
/// `static thread_local TYPE (*const p)[D1].. = ::moe_emu::shared_array<TYPE[D1]..>(N, "NAME", "FILE:LINE");
/// TYPE (&NAME)[D1].. = *p;` (`thread_local`, as before, so two host threads emulating at once do not share it;
/// one allocation per template instantiation and thread). Lines that only mention `__shared__` (comments) stay.
/// An error names the line of a declaration this does not understand.
fn guard_shared(text: &str, src: &Path) -> Result<String, String> {
    let mut out = String::with_capacity(text.len() + 4096);
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("__shared__ ") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let bad = || {
            format!(
                "{}:{}: the emulator cannot guard this __shared__ declaration (one per line: \
                 `__shared__ [__align__(N)] TYPE NAME[..]..;`)",
                src.display(),
                i + 1
            )
        };
        let (decl, tail) = rest.split_once(';').ok_or_else(bad)?;
        let mut decl = decl.trim();
        let mut align = "0".to_string();
        if let Some(r) = decl.strip_prefix("__align__(") {
            let (n, r) = r.split_once(')').ok_or_else(bad)?;
            align = n.trim().to_string();
            decl = r.trim();
        }
        let (head, dims) = match decl.find('[') {
            Some(k) => (decl[..k].trim_end(), &decl[k..]),
            None => (decl, ""),
        };
        let name_at = head
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(0, |k| k + 1);
        let (ty, name) = (head[..name_at].trim(), &head[name_at..]);
        if ty.is_empty() || name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(bad());
        }
        let indent = &line[..line.len() - trimmed.len()];
        let site = format!(
            "{}:{}",
            src.file_name().and_then(|f| f.to_str()).unwrap_or("?"),
            i + 1
        );
        out.push_str(&format!(
            "{indent}static thread_local ::moe_emu::SharedArray<{ty}{dims}> moe_emu_shared_{name}(\
             {align}, \"{name}\", \"{site}\"); \
             {ty} (&__restrict__ {name}){dims} = moe_emu_shared_{name}.get();{tail}\n"
        ));
    }
    Ok(out)
}
