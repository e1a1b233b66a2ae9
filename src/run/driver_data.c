/* The training data of a run, batch by batch (driver_internal.h): a text
 * corpus for a language model, an image set (Fashion-MNIST by default) for
 * a classifier, in a shuffled order that depends only on the seed. */
#include "run/driver_internal.h"

#include <string.h>

#define DEFAULT_IMAGE_DIR "/usr/share/datasets/fashion-mnist"

/* Back to the first batch of the run. */
void data_source_rewind(data_source *d)
{
    ar_rng_seed(&d->rng, ar_hash3(d->seed, 0xda7a, 0));
    d->pos = 0;
}

int data_source_open(data_source *d, const ar_model_spec *spec, const char *path, uint64_t seed)
{
    memset(d, 0, sizeof *d);
    d->seed = seed;
    d->perm_epoch = -1;
    data_source_rewind(d);
    int rc;
    if (spec->type == AR_MODEL_GPT) {
        if (!path)
            return ar_fail(AR_EINVAL, "a language model needs --data PATH (a text file)");
        d->is_text = 1;
        if ((rc = ar_text_load(path, &d->text)) != AR_OK)
            return rc;
        /* both splits must hold a window of block_size + 1 tokens; say so now
         * rather than at the first evaluation */
        long need = (long)spec->block_size + 1;
        long val = d->text.count - d->text.train_count;
        if (d->text.train_count < need || val < need)
            return ar_fail(AR_EINVAL,
                           "%s: too short for block_size %d: the training split has %ld tokens and "
                           "the validation split (last 10%%) %ld, each needs at least %ld",
                           path, spec->block_size, d->text.train_count, val, need);
        return AR_OK;
    }
    const char *dir = path ? path : DEFAULT_IMAGE_DIR;
    if ((rc = ar_image_set_load(dir, "train", &d->train)) != AR_OK)
        return rc;
    if ((rc = ar_image_set_load(dir, "t10k", &d->test)) != AR_OK)
        return rc;
    if (d->train.features != spec->inputs)
        return ar_fail(AR_ESHAPE, "%s: images have %d features but the model takes %d", dir,
                       d->train.features, spec->inputs);
    if (d->train.classes > spec->classes || d->test.classes > spec->classes)
        return ar_fail(AR_ESHAPE, "%s: labels go up to %d but the model has %d classes", dir,
                       (d->train.classes > d->test.classes ? d->train.classes : d->test.classes) - 1,
                       spec->classes);
    d->perm = ar_calloc((size_t)d->train.count, sizeof *d->perm);
    return d->perm ? AR_OK : AR_ENOMEM;
}

void data_source_close(data_source *d)
{
    ar_text_free(&d->text);
    ar_image_set_free(&d->train);
    ar_image_set_free(&d->test);
    ar_free(d->perm);
}

/* The permutation of epoch e depends only on (seed, e): resuming needs only
 * the sample position. */
static void shuffle_epoch(data_source *d, long epoch)
{
    int n = d->train.count;
    for (int i = 0; i < n; i++)
        d->perm[i] = i;
    ar_rng r;
    ar_rng_seed(&r, ar_hash3(d->seed, 0x5eed, (uint64_t)epoch));
    for (int i = n - 1; i > 0; i--) {
        int j = (int)ar_rng_below(&r, (uint64_t)i + 1);
        int32_t t = d->perm[i];
        d->perm[i] = d->perm[j];
        d->perm[j] = t;
    }
    d->perm_epoch = epoch;
}

/* Next training batch: inputs (B,T) tokens or (B,features) floats. */
int data_source_next(data_source *d, int B, int T, void *inputs, int32_t *targets)
{
    if (d->is_text)
        return ar_text_batch(&d->text, 0, &d->rng, B, T, inputs, targets);
    float *x = inputs;
    int F = d->train.features;
    for (int b = 0; b < B; b++) {
        long epoch = d->pos / d->train.count;
        if (epoch != d->perm_epoch)
            shuffle_epoch(d, epoch);
        int idx = d->perm[d->pos % d->train.count];
        memcpy(x + (size_t)b * F, d->train.images + (size_t)idx * F, (size_t)F * sizeof(float));
        targets[b] = d->train.labels[idx];
        d->pos++;
    }
    return AR_OK;
}
