#!/usr/bin/env node
'use strict';
// One supervised training step against running bios services, printed as one JSON line:
//   node demo.js --render HOST:PORT --train HOST:PORT          -> {"tokens", "loss", "step", "logprobs"}
//   node demo.js --render HOST:PORT --train HOST:PORT --bad    -> a malformed datum; prints the rejection
// The exit code is 0 on the expected outcome, 1 otherwise.

const { parseArgs } = require('node:util');
const { BiosClient, tensor, fromTensor } = require('./bios');

const CONVERSATION = [
  { role: 'user', content: 'Name a prime.' },
  { role: 'assistant', content: 'Seven.' },
];
const MODEL = 'ultrasafe/usf-mini';

/** Next-token shift: the model sees tokens[:-1] and is scored on predicting tokens[1:]. */
function supervisedDatum(tokens, weights) {
  return {
    model_input: { chunks: [{ encoded_text: { tokens: tokens.slice(0, -1) } }] },
    loss_fn_inputs: {
      target_tokens: tensor(tokens.slice(1), 'int64'),
      weights: tensor(weights.slice(1), 'float32'),
    },
  };
}

async function main() {
  const { values: args } = parseArgs({
    options: { render: { type: 'string' }, train: { type: 'string' }, bad: { type: 'boolean', default: false } },
  });
  if (!args.render || !args.train) throw new Error('usage: node demo.js --render HOST:PORT --train HOST:PORT [--bad]');

  const client = new BiosClient({ render: args.render, train: args.train });
  let sessionId;
  let stream;
  try {
    const { tokens, weights } = await client.render({ name: 'ultrasafe', tokenizer: MODEL }, CONVERSATION);
    const datum = supervisedDatum(tokens, weights);
    if (args.bad) datum.loss_fn_inputs.weights = tensor(weights.slice(1, -1), 'float32'); // one short

    sessionId = await client.createSession({ client: 'demo.js' });
    const model = await client.createModel(sessionId, MODEL, { rank: 8, train_attn: true, train_mlp: true });
    stream = client.operate(model.model_id);

    if (args.bad) {
      try {
        await stream.forwardBackward([datum], 'cross_entropy');
      } catch (err) {
        console.log(JSON.stringify({ rejected: true, code: err.code, message: err.details }));
        return 0;
      }
      console.log(JSON.stringify({ rejected: false }));
      return 1;
    }

    // Awaited one by one for clarity; submitting both at once would also work (the server keeps seq order).
    const output = await stream.forwardBackward([datum], 'cross_entropy');
    const optim = await stream.optimStep({ learning_rate: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-12 });
    const logprobs = fromTensor(output.loss_fn_outputs[0].tensors.logprobs);
    console.log(JSON.stringify({ tokens: tokens.length, loss: output.metrics['loss:sum'], step: optim.step, logprobs: logprobs.length }));
    return 0;
  } finally {
    // Close cleanly: half-close the stream and wait for its status, end the session, then the channels.
    if (stream) await stream.close();
    if (sessionId) await client.closeSession(sessionId).catch(() => {});
    client.close();
  }
}

main().then(
  (code) => { process.exitCode = code; },
  (err) => {
    console.error(`demo: ${err.message}`);
    process.exitCode = 1;
  },
);
