//! Named tensor sets: a layer's weights and its gradients implement `ParamSet` with the same
//! names, so optimizers, checkpoints and exporters pair them by name without knowing the layer.

use super::Tensor;

pub trait ParamSet {
    /// Call `f(name, tensor)` for every tensor, names prefixed with `prefix.`.
    fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, &'a Tensor));
    /// Mutable variant, same names and order.
    fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, &'a mut Tensor));
}

/// `prefix.name`, or `name` for an empty prefix.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Implements `ParamSet` for a struct from its tensor fields (`t`), optional tensor fields
/// (`opt`) and nested sets (`set`, `opt_set`).
#[macro_export]
macro_rules! param_set {
    ($ty:ty { $($kind:ident $field:ident),* $(,)? }) => {
        impl $crate::runtime::ParamSet for $ty {
            fn visit<'a>(&'a self, prefix: &str, f: &mut dyn FnMut(&str, &'a $crate::runtime::Tensor)) {
                $( $crate::param_set!(@visit self, prefix, f, $kind $field); )*
            }
            fn visit_mut<'a>(&'a mut self, prefix: &str, f: &mut dyn FnMut(&str, &'a mut $crate::runtime::Tensor)) {
                $( $crate::param_set!(@visit_mut self, prefix, f, $kind $field); )*
            }
        }
    };
    (@visit $s:ident, $p:ident, $f:ident, t $field:ident) => {
        $f(&$crate::runtime::params::join($p, stringify!($field)), &$s.$field)
    };
    (@visit $s:ident, $p:ident, $f:ident, opt $field:ident) => {
        if let Some(t) = &$s.$field { $f(&$crate::runtime::params::join($p, stringify!($field)), t) }
    };
    (@visit $s:ident, $p:ident, $f:ident, set $field:ident) => {
        $crate::runtime::ParamSet::visit(&$s.$field, &$crate::runtime::params::join($p, stringify!($field)), $f)
    };
    (@visit $s:ident, $p:ident, $f:ident, opt_set $field:ident) => {
        if let Some(x) = &$s.$field { $crate::runtime::ParamSet::visit(x, &$crate::runtime::params::join($p, stringify!($field)), $f) }
    };
    (@visit_mut $s:ident, $p:ident, $f:ident, t $field:ident) => {
        $f(&$crate::runtime::params::join($p, stringify!($field)), &mut $s.$field)
    };
    (@visit_mut $s:ident, $p:ident, $f:ident, opt $field:ident) => {
        if let Some(t) = &mut $s.$field { $f(&$crate::runtime::params::join($p, stringify!($field)), t) }
    };
    (@visit_mut $s:ident, $p:ident, $f:ident, set $field:ident) => {
        $crate::runtime::ParamSet::visit_mut(&mut $s.$field, &$crate::runtime::params::join($p, stringify!($field)), $f)
    };
    (@visit_mut $s:ident, $p:ident, $f:ident, opt_set $field:ident) => {
        if let Some(x) = &mut $s.$field { $crate::runtime::ParamSet::visit_mut(x, &$crate::runtime::params::join($p, stringify!($field)), $f) }
    };
}
