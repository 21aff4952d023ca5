//! The engine's decoding drives the 2017 encoder-decoder (weights from the
//! PyTorch fixture) through the same LanguageModel interface as Gemma.

use std::sync::Arc;

use attn_engine::{beam_search, BeamParams};
use attn_models::{ConditionedDecoder, Transformer, TransformerConfig};
use attn_nn::{SafetensorsSource, Weights};
use candle_core::{DType, Device, IndexOp, Tensor};

fn model() -> (Transformer, Tensor) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/transformer_2017.safetensors");
    let source = Arc::new(SafetensorsSource::open(&[path]).unwrap());
    let cfg = TransformerConfig {
        d_model: 32,
        n_heads: 4,
        n_encoder_layers: 2,
        n_decoder_layers: 2,
        d_ff: 64,
        dropout: 0.0,
        ..TransformerConfig::base(23, 19)
    };
    let m = Transformer::load(&Weights::new(source.clone(), DType::F32, &Device::Cpu), &cfg).unwrap();
    let src = source.load_raw("input.src", &Device::Cpu).unwrap().to_dtype(DType::U32).unwrap();
    (m, src)
}

#[test]
fn beam_width_one_is_greedy_and_wider_beams_score_at_least_as_well() {
    let (m, src) = model();
    let enc = m.encode(&src.i((0..1, ..)).unwrap(), None, false).unwrap();

    // Greedy by hand with the decoder state.
    let mut state = m.start_decoding(&enc).unwrap();
    let mut tokens = vec![1u32];
    let mut greedy_logprob = 0f64;
    for _ in 0..6 {
        let last = Tensor::new(&[[*tokens.last().unwrap()]], &Device::Cpu).unwrap();
        let lp = Transformer::log_softmax(&m.decode_step(&last, &mut state).unwrap()).unwrap().i((0, 0)).unwrap();
        let next = lp.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        greedy_logprob += lp.get(next as usize).unwrap().to_scalar::<f32>().unwrap() as f64;
        tokens.push(next);
        if next == 2 {
            break;
        }
    }

    let lm = ConditionedDecoder::new(&m, enc).unwrap();
    let params = BeamParams { width: 1, max_tokens: 6, length_penalty: 0.0, ..BeamParams::default() };
    let beams = beam_search(&lm, &[1], &[2], &params).unwrap();
    let mut expected = tokens[1..].to_vec();
    if expected.last() == Some(&2) {
        expected.pop();
    }
    assert_eq!(beams[0].tokens, expected);
    assert!((beams[0].logprob - greedy_logprob).abs() < 1e-4, "{} vs {greedy_logprob}", beams[0].logprob);

    let params = BeamParams { width: 4, max_tokens: 6, length_penalty: 0.0, n_best: 3, ..BeamParams::default() };
    let wide = beam_search(&lm, &[1], &[2], &params).unwrap();
    assert_eq!(wide.len(), 3);
    assert!(wide[0].score >= beams[0].score - 1e-9, "beam 4 {} < greedy {}", wide[0].score, beams[0].score);
    assert!(wide.windows(2).all(|w| w[0].score >= w[1].score));
}
