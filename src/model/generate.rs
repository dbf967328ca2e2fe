//! Text generation on the key/value cache: [`SamplingConfig`] (temperature, top-k, top-p,
//! seed), the [`Sampler`] that draws a token from a row of logits, and
//! [`Gpt2::generate`], which streams each token as it is produced.

use super::Gpt2;
use crate::{Error, Result};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How [`Gpt2::generate`] picks each token: the logits divided by `temperature`, then
/// kept to the `top_k` most likely tokens, then to the smallest set of most likely tokens
/// whose probability reaches `top_p` (nucleus sampling), then drawn from the renormalised
/// softmax with a ChaCha8 stream seeded by `seed` — the order of transformers' warpers.
/// `temperature = 0` is greedy decoding (the argmax, ties to the lowest id), whatever
/// `top_k` and `top_p` say.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// The most tokens to generate (fewer when the stop token comes first).
    pub max_new_tokens: usize,
    /// Softmax temperature: finite and ≥ 0; 0 is greedy.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens; 0 turns the filter off.
    pub top_k: usize,
    /// Keep the most likely tokens until their probability reaches `top_p`, in `(0, 1]`;
    /// 1 turns the filter off.
    pub top_p: f64,
    /// The seed of the sampling stream: the same seed, model and prompt give the same
    /// tokens.
    pub seed: u64,
}

impl Default for SamplingConfig {
    /// 64 tokens at temperature 1, no top-k or top-p filter, seed 0.
    fn default() -> Self {
        SamplingConfig {
            max_new_tokens: 64,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    /// Greedy decoding of up to `max_new_tokens` tokens (temperature 0).
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingConfig {
            max_new_tokens,
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks the settings: `temperature` finite and ≥ 0, `top_p` in `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::invalid(format!(
                "sampling: temperature must be finite and ≥ 0 (0 is greedy), got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::invalid(format!(
                "sampling: top_p must be in (0, 1] (1 turns it off), got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Draws tokens from rows of logits as a [`SamplingConfig`] says, from its own seeded
/// stream. The draws are portable: the uniform numbers come from ChaCha8's raw 64-bit
/// output (53 bits each) and every probability is computed in f64 in a fixed order, so a
/// seed gives the same tokens on every platform.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler for `cfg` (validated), its stream at the start of `cfg.seed`.
    pub fn new(cfg: &SamplingConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Sampler {
            cfg: cfg.clone(),
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
        })
    }

    /// The next token for one row of logits (one per vocabulary id).
    ///
    /// Errors: an empty row, a NaN or +∞ logit, or every logit −∞ (a −∞ logit is a
    /// token that cannot be drawn).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::invalid("sampling: an empty row of logits"));
        }
        if let Some(i) = logits
            .iter()
            .position(|x| x.is_nan() || *x == f32::INFINITY)
        {
            return Err(Error::invalid(format!(
                "sampling: logit {} of token {i} is not a number below +inf",
                logits[i]
            )));
        }
        let best = argmax(logits);
        if logits[best] == f32::NEG_INFINITY {
            return Err(Error::invalid("sampling: every logit is -inf"));
        }
        let cfg = &self.cfg;
        if cfg.temperature == 0.0 {
            return Ok(best as u32);
        }
        // Candidates, most likely first (ties to the lower id), when a filter needs the order.
        let filtered = (cfg.top_k > 0 && cfg.top_k < logits.len()) || cfg.top_p < 1.0;
        let mut ids: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize] > f32::NEG_INFINITY)
            .collect();
        if filtered {
            let order = |a: &u32, b: &u32| {
                logits[*b as usize]
                    .total_cmp(&logits[*a as usize])
                    .then(a.cmp(b))
            };
            if cfg.top_k > 0 && cfg.top_k < ids.len() {
                ids.select_nth_unstable_by(cfg.top_k - 1, order);
                ids.truncate(cfg.top_k);
            }
            ids.sort_unstable_by(order);
        }
        // Unnormalised probabilities, exp((l − max) / T), in f64.
        let (top, t) = (f64::from(logits[best]), cfg.temperature);
        let mut w: Vec<f64> = ids
            .iter()
            .map(|&i| ((f64::from(logits[i as usize]) - top) / t).exp())
            .collect();
        if cfg.top_p < 1.0 {
            // Keep tokens while the mass before them is below top_p (the first always).
            let total: f64 = w.iter().sum();
            let (mut before, mut keep) = (0.0, 0);
            while keep < w.len() && (keep == 0 || before < cfg.top_p * total) {
                before += w[keep];
                keep += 1;
            }
            w.truncate(keep);
            ids.truncate(keep);
        }
        let total: f64 = w.iter().sum();
        let u = (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let target = u * total;
        let mut acc = 0.0;
        for (&id, &wi) in ids.iter().zip(&w) {
            acc += wi;
            if target < acc {
                return Ok(id);
            }
        }
        // Rounding can leave target ≥ the running sum at the end: the last kept token.
        Ok(*ids.last().expect("at least the most likely token is kept"))
    }
}

/// The index of the largest value, the first of equal ones (NaN never wins).
fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |acc, (j, &x)| if x > acc.1 { (j, x) } else { acc },
        )
        .0
}

impl Gpt2 {
    /// Generates up to `cfg.max_new_tokens` tokens after `prompt` on the key/value cache
    /// (one prefill of the prompt, then one position per token), calling `on_token` with
    /// each token as soon as it is drawn (an error from it stops the generation and is
    /// returned). Stops early after `stop` (e.g. GPT-2's `<|endoftext|>`, 50256), which is
    /// streamed and returned like any other token. Returns the new tokens. The prompt and
    /// the new tokens must fit the context together: `prompt.len() + max_new_tokens ≤
    /// n_positions`, checked before anything runs (no silent stop at the limit).
    ///
    /// Errors: an invalid `cfg` ([`SamplingConfig::validate`]), an empty prompt, a prompt
    /// or stop token outside the vocabulary, the context overflow above (invalid
    /// argument); non-finite logits; `on_token`'s errors.
    pub fn generate(
        &self,
        prompt: &[u32],
        cfg: &SamplingConfig,
        stop: Option<u32>,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Vec<u32>> {
        let mut sampler = Sampler::new(cfg)?;
        let (v, ctx) = (self.config.vocab_size, self.config.n_positions);
        if prompt.is_empty() {
            return Err(Error::invalid(
                "generate: the prompt is empty (start it with a token, e.g. <|endoftext|>)",
            ));
        }
        if let Some((i, &t)) = prompt.iter().enumerate().find(|&(_, &t)| t as usize >= v) {
            return Err(Error::invalid(format!(
                "generate: prompt token {t} at position {i} is outside the vocabulary of {v}"
            )));
        }
        if let Some(s) = stop.filter(|&s| s as usize >= v) {
            return Err(Error::invalid(format!(
                "generate: the stop token {s} is outside the vocabulary of {v}"
            )));
        }
        let total = prompt.len().saturating_add(cfg.max_new_tokens);
        if total > ctx {
            return Err(Error::invalid(format!(
                "generate: a prompt of {} tokens + max_new_tokens {} = {total} exceeds the model's context of {ctx} positions",
                prompt.len(),
                cfg.max_new_tokens
            )));
        }
        if cfg.max_new_tokens == 0 {
            return Ok(Vec::new());
        }
        // The last new token is never fed back: one position fewer than the total.
        let mut cache = self.new_kv_cache(1, total - 1)?;
        let (head, last) = prompt.split_at(prompt.len() - 1);
        if !head.is_empty() {
            self.decode(&mut cache, head, 1, head.len(), false)?;
        }
        let mut next = last[0];
        let mut out = Vec::with_capacity(cfg.max_new_tokens);
        while out.len() < cfg.max_new_tokens {
            let logits = self.forward_cached(&mut cache, &[next], 1, 1)?;
            let tok = sampler.sample(&logits.to_vec_f32()?)?;
            out.push(tok);
            on_token(tok)?;
            if stop == Some(tok) {
                break;
            }
            next = tok;
        }
        Ok(out)
    }

    /// Greedy decoding of `batch` prompts of one length (`prompts`: `batch · len` ids) on
    /// the cache: `n_new` tokens each, `batch · n_new` ids. The caller validated the sizes
    /// (`len ≥ 1`, `len + n_new ≤ n_positions + 1`).
    pub(super) fn greedy_cached(
        &self,
        prompts: &[u32],
        batch: usize,
        n_new: usize,
    ) -> Result<Vec<u32>> {
        let len = prompts.len() / batch;
        if n_new == 0 {
            return Ok(Vec::new());
        }
        let mut cache = self.new_kv_cache(batch, len + n_new - 1)?;
        if len > 1 {
            let head: Vec<u32> = prompts
                .chunks(len)
                .flat_map(|p| p[..len - 1].iter().copied())
                .collect();
            self.decode(&mut cache, &head, batch, len - 1, false)?;
        }
        let mut next: Vec<u32> = prompts.chunks(len).map(|p| p[len - 1]).collect();
        let mut out = vec![0; batch * n_new];
        for step in 0..n_new {
            let logits = self
                .forward_cached(&mut cache, &next, batch, 1)?
                .to_vec_f32()?;
            let v = logits.len() / batch;
            for (bi, row) in logits.chunks(v).enumerate() {
                next[bi] = argmax(row) as u32;
                out[bi * n_new + step] = next[bi];
            }
        }
        Ok(out)
    }
}
