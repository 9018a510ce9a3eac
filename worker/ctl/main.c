
/*
 * Copyright (C) nginx-meter authors
 *
 * meterctl's main(): picks the command (meterctl.c), loads -c FILE, runs it.
 */


#include <stdio.h>
#include <string.h>
#include <sysexits.h>

#include <cjson/cJSON.h>

#include "log.h"
#include "meterctl.h"


int
main(int argc, char **argv)
{
    char                   err[1024];
    int                    rc;
    meter_redis_t          r;
    meterctl_opts_t        o;
    const meterctl_cmd_t  *cmd;

    meter_log_prefix = 0;

    memset(&o, 0, sizeof(meterctl_opts_t));
    memset(&r, 0, sizeof(meter_redis_t));
    cmd = NULL;

    rc = meterctl_select(argc, argv, &o, &cmd);
    if (rc != -1) {
        return rc;
    }

    if (o.config != NULL) {
        o.cf = meter_conf_load(o.config, err, sizeof(err));
        if (o.cf == NULL) {
            fprintf(stderr, "meterctl: %s\n", err);
            return EX_CONFIG;
        }
    }

    rc = cmd->run(&o, &r);

    if (rc == EX_USAGE) {
        fprintf(stderr, "Run \"meterctl %s%s%s --help\" for usage.\n",
                cmd->group, cmd->name ? " " : "",
                cmd->name ? cmd->name : "");
    }

    meter_redis_close(&r);
    meter_conf_free(o.cf);

    return rc;
}
