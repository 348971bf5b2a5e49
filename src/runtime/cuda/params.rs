//! Kernel parameter layouts: each kernel's parameter sizes in bytes, in order, read from the
//! `.entry` declarations of the PTX NVRTC emits (`.param .u64 p`, `.param .u32 n`, `.param .f32 x`,
//! `.param .align 64 .b8 map[128]` for a struct by value). Cached beside the CUBIN as text
//! (`compile.rs`); every launch's argument words are checked against them (`launch.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::runtime::{Error, Result};

/// Kernel name → its parameters' sizes in bytes.
pub(crate) type ParamLayouts = HashMap<String, Arc<[u32]>>;

/// The layouts of every `.entry` in `ptx`.
pub(crate) fn from_ptx(ptx: &str) -> Result<ParamLayouts> {
    let mut out = ParamLayouts::new();
    let mut rest = ptx;
    while let Some(at) = rest.find(".entry ") {
        let decl = &rest[at + ".entry ".len()..];
        let open = decl
            .find('(')
            .ok_or_else(|| bad_ptx(decl, "'(' after the kernel name"))?;
        let close = decl
            .find(')')
            .ok_or_else(|| bad_ptx(decl, "')' closing the parameter list"))?;
        let name = decl[..open].trim();
        let params = decl[open + 1..close]
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| param_size(p).ok_or_else(|| bad_ptx(p, "a parameter declaration")))
            .collect::<Result<Vec<u32>>>()?;
        out.insert(name.to_string(), params.into());
        rest = &decl[close..];
    }
    Ok(out)
}

fn bad_ptx(at: &str, expected: &str) -> Error {
    let line = at.trim_start().lines().next().unwrap_or("").trim();
    Error::Invalid(format!(
        "PTX entry declaration: expected {expected} at {line:?}"
    ))
}

/// Bytes of one parameter: `.param [.align N] .TYPE [.ptr …] name[[COUNT]]` — the type's width
/// times the array count (`.ptr` qualifiers describe the pointee, not the parameter).
fn param_size(decl: &str) -> Option<u32> {
    let mut words = decl.split_whitespace();
    if words.next()? != ".param" {
        return None;
    }
    let mut ty = words.next()?;
    if ty == ".align" {
        words.next()?;
        ty = words.next()?;
    }
    let bits: u32 = ty.get(2..)?.parse().ok()?;
    if !matches!(ty.get(..2)?, ".u" | ".s" | ".b" | ".f") || bits % 8 != 0 {
        return None;
    }
    let name = words.last()?;
    let count = match name.split_once('[') {
        Some((_, n)) => n.strip_suffix(']')?.parse().ok()?,
        None => 1,
    };
    Some(bits / 8 * count)
}

/// The cache file's text: one line per kernel, its name then its parameter sizes.
pub(crate) fn to_text(layouts: &ParamLayouts) -> String {
    let mut names: Vec<&String> = layouts.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let sizes: Vec<String> = layouts[n].iter().map(|s| s.to_string()).collect();
            format!("{n} {}\n", sizes.join(" "))
        })
        .collect()
}

/// The layouts written by `to_text`; None for anything else (the cache entry is then rebuilt).
pub(crate) fn from_text(text: &str) -> Option<ParamLayouts> {
    text.lines()
        .map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?.to_string();
            let sizes = words
                .map(|w| w.parse().ok())
                .collect::<Option<Vec<u32>>>()?;
            Some((name, sizes.into()))
        })
        .collect()
}

/// Checks a launch of `kernel` whose argument sizes are `given` against its parameter sizes
/// `expected`: the count, then each argument's size (no allocation unless it fails).
pub(crate) fn check_args(
    kernel: &str,
    expected: &[u32],
    given: impl ExactSizeIterator<Item = u32>,
) -> Result<()> {
    if given.len() != expected.len() {
        return Err(Error::Invalid(format!(
            "launch of {kernel}: {} arguments given, the kernel has {} parameters ({expected:?} \
             bytes)",
            given.len(),
            expected.len()
        )));
    }
    match expected
        .iter()
        .zip(given)
        .enumerate()
        .find(|(_, (e, g))| **e != *g)
    {
        Some((i, (e, g))) => Err(Error::Invalid(format!(
            "launch of {kernel}: parameter {i} is {e} bytes, the argument given is {g} bytes"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC 13.0's PTX for sm_90a (grouped_wgmma.cu's tt_nt_bf16 with its tensor maps by value,
    /// grouped_schedule.cu's gg_tile_prefix, bodies cut short), then a declaration in the `.ptr`
    /// form and a kernel without parameters.
    const PTX: &str = "\
.version 9.0
.target sm_90a
.address_size 64

	// .globl	tt_nt_bf16
.extern .shared .align 16 .b8 smem[];

.visible .entry tt_nt_bf16(
	.param .u64 tt_nt_bf16_param_0,
	.param .align 64 .b8 tt_nt_bf16_param_1[128],
	.param .align 64 .b8 tt_nt_bf16_param_2[128],
	.param .u64 tt_nt_bf16_param_3,
	.param .u64 tt_nt_bf16_param_4,
	.param .u32 tt_nt_bf16_param_5,
	.param .u32 tt_nt_bf16_param_6,
	.param .u32 tt_nt_bf16_param_7,
	.param .u32 tt_nt_bf16_param_8
)
.maxntid 384, 1, 1
.minnctapersm 1
{
	.reg .pred 	%p<2>;
	ld.param.u64 	%rd1, [tt_nt_bf16_param_0];
	mov.b64 	%rd2, tt_nt_bf16_param_1;
	ret;
}
	// .globl	gg_tile_prefix
.visible .entry gg_tile_prefix(
	.param .u64 gg_tile_prefix_param_0,
	.param .u64 gg_tile_prefix_param_1,
	.param .u32 gg_tile_prefix_param_2
)
{
	ret;
}
.visible .entry k(
	.param .u64 .ptr .global .align 4 k_param_0,
	.param .f32 k_param_1,
	.param .u16 k_param_2
)
{
	ret;
}
.visible .entry none()
{
	ret;
}
";

    #[test]
    fn ptx_entries_give_parameter_sizes() {
        let l = from_ptx(PTX).unwrap();
        assert_eq!(l.len(), 4);
        assert_eq!(&*l["tt_nt_bf16"], &[8, 128, 128, 8, 8, 4, 4, 4, 4]);
        assert_eq!(&*l["gg_tile_prefix"], &[8, 8, 4]);
        assert_eq!(&*l["k"], &[8, 4, 2]);
        assert!(l["none"].is_empty());
        assert_eq!(from_text(&to_text(&l)).unwrap(), l);
    }

    #[test]
    fn malformed_ptx_and_cache_text_are_refused() {
        let e = from_ptx(".entry k(\n\t.param .pred k_param_0\n)\n").unwrap_err();
        assert!(e.to_string().contains(".param .pred k_param_0"), "{e}");
        assert!(from_ptx(".entry k").is_err());
        assert!(from_text("k 8 x\n").is_none());
        assert!(from_text("").unwrap().is_empty());
    }

    #[test]
    fn arguments_are_checked_by_count_and_size() {
        assert!(check_args("k", &[8, 128, 4], [8, 128, 4].into_iter()).is_ok());
        let e = check_args("gg_tile_prefix", &[8, 8, 4], [8, 8].into_iter()).unwrap_err();
        assert!(
            e.to_string()
                .contains("gg_tile_prefix: 2 arguments given, the kernel has 3 parameters"),
            "{e}"
        );
        let e = check_args("k", &[8, 4, 4], [8, 8, 4].into_iter()).unwrap_err();
        assert!(
            e.to_string()
                .contains("k: parameter 1 is 4 bytes, the argument given is 8 bytes"),
            "{e}"
        );
    }
}
