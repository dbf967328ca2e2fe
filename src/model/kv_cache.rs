//! Incremental decoding: a per-layer key/value cache ([`KvCache`]) and
//! [`Gpt2::forward_cached`], which runs only the new positions of each sequence against
//! it, so a generated token costs one position instead of a forward over the whole prefix.

use super::{ForwardOptions, Gpt2};
use crate::ops;
use crate::{DType, Device, Error, Result, Tensor};

/// The keys and values of every layer for `batch` sequences of up to `max_len` positions:
/// per layer `K` and `V` `[batch, n_head, max_len, head_dim]` on the model's device, in its
/// dtype, and the number of positions already in ([`KvCache::len`]). Made by
/// [`Gpt2::new_kv_cache`], filled by [`Gpt2::forward_cached`].
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    batch: usize,
    n_head: usize,
    head_dim: usize,
    max_len: usize,
    len: usize,
    dtype: DType,
    device: Device,
}

impl KvCache {
    /// Positions already cached per sequence (the next call's first position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sequences the cache holds.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// The most positions it can hold per sequence.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Layer `layer`'s key and value caches `[batch, n_head, max_len, head_dim]` (rows
    /// `0..len()` hold data), if the model has that layer.
    pub fn layer(&self, layer: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(layer).map(|(k, v)| (k, v))
    }

    /// The element type of the cached keys and values.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the cache lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Forgets every cached position (the buffers are kept): the next
    /// [`Gpt2::forward_cached`] starts new sequences at position 0.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl Gpt2 {
    /// An empty cache for `batch` sequences of up to `max_len` positions (`1 ≤ max_len ≤
    /// n_positions`), on the model's device and in its dtype: `2 · n_layer · batch ·
    /// max_len · n_embd` elements.
    ///
    /// Errors: `batch == 0`, `max_len == 0` or `max_len > n_positions` (invalid argument);
    /// allocation failures.
    pub fn new_kv_cache(&self, batch: usize, max_len: usize) -> Result<KvCache> {
        let cfg = &self.config;
        if batch == 0 {
            return Err(Error::invalid("new_kv_cache: batch must be at least 1"));
        }
        if max_len == 0 || max_len > cfg.n_positions {
            return Err(Error::invalid(format!(
                "new_kv_cache: max_len {max_len} must be 1 to the model's context of {} positions",
                cfg.n_positions
            )));
        }
        let head_dim = cfg.head_dim();
        let (dtype, device) = (self.dtype(), self.device());
        let buffer = || ops::kv_cache_tensor(batch, cfg.n_head, max_len, head_dim, dtype, &device);
        let layers = (0..cfg.n_layer)
            .map(|_| Ok((buffer()?, buffer()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            batch,
            n_head: cfg.n_head,
            head_dim,
            max_len,
            len: 0,
            dtype,
            device,
        })
    }

    /// Runs `n_new` new positions of each of `cache.batch()` sequences (`tokens`: `batch ·
    /// n_new` ids, row-major), at positions `cache.len()..cache.len() + n_new`, against
    /// the cached keys and values of the earlier positions; appends their keys and values
    /// to the cache and returns their logits `[batch · n_new, V]`, as [`Gpt2::forward`]
    /// gives for those rows of the whole sequences (prefill with the prompt, then one
    /// token per step). No tape, no dropout; adapters apply as in `forward`, merged or not.
    ///
    /// Errors (the cache unchanged): `batch` not the cache's, `n_new == 0`, `tokens.len()
    /// != batch · n_new`, more positions than the cache holds, a token outside the
    /// vocabulary, or a cache made for a model of another shape, dtype or device.
    pub fn forward_cached(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        batch: usize,
        n_new: usize,
    ) -> Result<Tensor> {
        let logits = self.decode(cache, tokens, batch, n_new, true)?;
        Ok(logits.expect("decode with the head returns logits"))
    }

    /// [`Gpt2::forward_cached`], computing the LM head only when `head` (a prefill whose
    /// logits nobody reads skips its `n_new × V` product).
    pub(super) fn decode(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        batch: usize,
        n_new: usize,
        head: bool,
    ) -> Result<Option<Tensor>> {
        let cfg = &self.config;
        self.check_cache(cache)?;
        if batch != cache.batch {
            return Err(Error::invalid(format!(
                "forward_cached: batch {batch} for a cache of {} sequences",
                cache.batch
            )));
        }
        if n_new == 0 || batch.checked_mul(n_new) != Some(tokens.len()) {
            return Err(Error::invalid(format!(
                "forward_cached: {} token ids for batch {batch} × {n_new} new positions (at least 1)",
                tokens.len()
            )));
        }
        let pos = cache.len;
        if pos + n_new > cache.max_len {
            return Err(Error::invalid(format!(
                "forward_cached: {n_new} new positions after {pos} exceed the cache's {} (the model's context is {})",
                cache.max_len, cfg.n_positions
            )));
        }
        // Token ids below V: `wte`'s padding rows are not tokens.
        super::vocab::check_tokens(cfg, tokens)?;
        let opts = ForwardOptions::default();
        let eps = cfg.layer_norm_epsilon;
        // Checks the tokens before anything is appended: a failed call leaves the cache as
        // it was (its rows past `len` are free to be overwritten).
        let mut x = ops::embedding_at(tokens, batch, n_new, pos, &self.wte, &self.wpe)?;
        for (i, (b, (kc, vc))) in self.blocks.iter().zip(&cache.layers).enumerate() {
            let h = ops::layer_norm(&x, &b.ln_1.weight, &b.ln_1.bias, eps)?;
            let qkv = self.apply_linear(&b.c_attn, &h, opts, (i, 0))?;
            let a = ops::decode_attention(&qkv, kc, vc, pos, cfg.n_head)?;
            let a = self.apply_linear(&b.attn_c_proj, &a, opts, (i, 1))?;
            x = ops::add(&x, &a)?;
            let h = ops::layer_norm(&x, &b.ln_2.weight, &b.ln_2.bias, eps)?;
            let h = self.apply_linear(&b.c_fc, &h, opts, (i, 2))?;
            let h = ops::gelu(&h)?;
            let h = self.apply_linear(&b.mlp_c_proj, &h, opts, (i, 3))?;
            x = ops::add(&x, &h)?;
        }
        cache.len = pos + n_new;
        if !head {
            return Ok(None);
        }
        let x = ops::layer_norm(&x, &self.ln_f.weight, &self.ln_f.bias, eps)?;
        let x = ops::reshape(&x, [batch * n_new, cfg.n_embd])?;
        // The real vocabulary's logits only: `wte`'s padding rows are not tokens.
        super::vocab::Head::Vocab
            .apply(cfg, &x, &self.wte)
            .map(Some)
    }

    /// The cache fits this model: its layers, heads, head dim, dtype and device.
    fn check_cache(&self, cache: &KvCache) -> Result<()> {
        let cfg = &self.config;
        let head_dim = cfg.head_dim();
        if cache.layers.len() != cfg.n_layer
            || cache.n_head != cfg.n_head
            || cache.head_dim != head_dim
        {
            return Err(Error::invalid(format!(
                "forward_cached: a cache of {} layers × {} heads of {} for a model of {} × {} of {head_dim}",
                cache.layers.len(),
                cache.n_head,
                cache.head_dim,
                cfg.n_layer,
                cfg.n_head
            )));
        }
        if cache.dtype() != self.dtype() || cache.device() != self.device() {
            return Err(Error::invalid(format!(
                "forward_cached: a {} cache on {} for a {} model on {}",
                cache.dtype(),
                cache.device(),
                self.dtype(),
                self.device()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "kv_cache_tests.rs"]
mod tests;
