// Loaded into s3rver with `node --require` (runledger's embedded log store; see devstack.py).
//
// s3rver 3.7.1 opens an object's file before it answers a conditional GET (If-None-Match, If-Modified-Since)
// with 304 Not Modified, and never closes it. Tansu reads its watermarks and metadata that way many times a
// second, so within the hour the store runs out of file descriptors, every request fails with 500, and the
// broker can no longer serve a fetch: workers stop. This closes the file of every GET that does not send it.
'use strict';

const path = require('path');

const controller = require(require.resolve('s3rver/lib/controllers/object', {
  paths: [path.dirname(process.argv[1])],
}));
const getObject = controller.getObject;

controller.getObject = async function getObjectClosingItsFile(ctx) {
  const store = ctx.store;
  let object = null;
  ctx.store = Object.create(store, {
    getObject: { value: async (...args) => (object = await store.getObject(...args)) },
  });
  try {
    await getObject(ctx);
  } finally {
    ctx.store = store;
    if (object && object.content && ctx.body !== object.content) {
      object.content.destroy();
    }
  }
};
