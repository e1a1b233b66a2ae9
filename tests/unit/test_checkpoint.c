/* Checkpoints are written as a whole (checkpoint.c): a set interrupted
 * before its state.json is discarded and the previous checkpoint stays, one
 * interrupted while moving into place is finished by the next reader. */
#include "train/checkpoint.h"

#include "arceus.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir[256];

static void mk_tmp(void)
{
    snprintf(dir, sizeof dir, "/tmp/ar_test_ckpt_XXXXXX");
    cr_assert_not_null(mkdtemp(dir));
}

static void rm_tmp(void)
{
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    cr_assert_eq(system(cmd), 0);
}

TestSuite(checkpoint, .init = mk_tmp, .fini = rm_tmp);

static ar_model_spec small_mlp(void)
{
    ar_model_spec s;
    memset(&s, 0, sizeof s);
    s.type = AR_MODEL_MLP;
    s.inputs = 6;
    s.n_hidden = 1;
    s.hidden[0] = 4;
    s.classes = 3;
    s.activation = AR_ACT_RELU;
    return s;
}

/* A checkpoint in `where` whose weights are all `value`, at step `step`. */
static void save_to(const char *where, ar_stage *st, float value, long step)
{
    for (int j = 0; j < st->nparams; j++)
        for (long k = 0; k < st->params[j]->numel; k++)
            st->params[j]->data[k] = value;
    ar_train_state s = {.step = step, .batch = 4, .micro_batches = 1, .steps = 100, .market_job = 7};
    cr_assert_eq(ar_checkpoint_save(where, &st, 1, &s), AR_OK, "%s", ar_last_error());
}

static void check(ar_stage *st, float value, long step)
{
    ar_train_state s;
    cr_assert_eq(ar_checkpoint_load_state(dir, &s), AR_OK, "%s", ar_last_error());
    cr_assert_eq(s.step, step);
    cr_assert_eq(s.market_job, 7);
    cr_assert_eq(ar_checkpoint_load_params(dir, &st, 1, 1), AR_OK, "%s", ar_last_error());
    cr_assert_eq(st->params[0]->data[0], value);
    char pending[300];
    snprintf(pending, sizeof pending, "%s/.pending", dir);
    struct stat sb;
    cr_assert_neq(stat(pending, &sb), 0, "the reader settles .pending");
}

static void move(const char *from_dir, const char *to_dir, const char *name)
{
    char a[300], b[300];
    snprintf(a, sizeof a, "%s/%s", from_dir, name);
    snprintf(b, sizeof b, "%s/%s", to_dir, name);
    cr_assert_eq(rename(a, b), 0, "%s", a);
}

Test(checkpoint, an_interrupted_write_keeps_the_previous_checkpoint_or_is_finished)
{
    ar_model_spec spec = small_mlp();
    ar_optim_config oc = {.kind = AR_OPT_ADAMW, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f};
    ar_stage st;
    cr_assert_eq(ar_stage_create(&st, &spec, 0, ar_spec_units(&spec), 4, 1, 1, &oc), AR_OK, "%s", ar_last_error());
    ar_stage *p = &st;
    save_to(dir, p, 1.0f, 10);
    check(p, 1.0f, 10);

    /* step 20 written into a side folder, then moved in as if killed midway */
    char side[300], pending[300];
    snprintf(side, sizeof side, "%s/next", dir);
    snprintf(pending, sizeof pending, "%s/.pending", dir);
    /* 1: killed before its state.json was written: discarded */
    save_to(side, p, 2.0f, 20);
    cr_assert_eq(mkdir(pending, 0755), 0);
    move(side, pending, "model.safetensors");
    check(p, 1.0f, 10);
    /* 1b: killed while writing a file: its temporary is left in .pending (CI
     * once failed to resume such a run: "cannot remove: Directory not empty") */
    save_to(side, p, 2.0f, 20);
    cr_assert_eq(mkdir(pending, 0755), 0);
    move(side, pending, "model.safetensors");
    char partial[400];
    snprintf(partial, sizeof partial, "%s/optimizer.safetensors.tmp.4242", pending);
    FILE *f = fopen(partial, "w");
    cr_assert(f);
    fputs("half a file", f);
    fclose(f);
    check(p, 1.0f, 10);
    /* a file that is not the writer's stays, and the error says so */
    cr_assert_eq(mkdir(pending, 0755), 0);
    snprintf(partial, sizeof partial, "%s/notes.txt", pending);
    f = fopen(partial, "w");
    cr_assert(f);
    fclose(f);
    ar_train_state s;
    cr_assert_neq(ar_checkpoint_load_state(dir, &s), AR_OK);
    cr_assert(strstr(ar_last_error(), "not part of a checkpoint"), "%s", ar_last_error());
    cr_assert_eq(unlink(partial), 0);
    cr_assert_eq(rmdir(pending), 0);
    /* 2: killed while moving a complete set into place: finished */
    save_to(side, p, 2.0f, 20);
    cr_assert_eq(mkdir(pending, 0755), 0);
    move(side, pending, "optimizer.safetensors");
    move(side, pending, "spec.json");
    move(side, pending, "state.json");
    move(side, dir, "model.safetensors"); /* moved in before the "kill" */
    check(p, 2.0f, 20);
    ar_stage_destroy(&st);
}
