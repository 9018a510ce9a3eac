
/*
 * Copyright (C) nginx-meter authors
 *
 * Provider lookup by config name.  The weak definitions below stand in for
 * a provider whose source file is not part of this build: its init fails
 * with a clear message instead of the link failing.
 */


#include <stdio.h>
#include <string.h>

#include "provider.h"


static int
meter_unbuilt_init(meter_provider_t *p, const meter_conf_t *cf, char *err,
    size_t errlen)
{
    (void) cf;

    snprintf(err, errlen, "provider \"%s\" is not built into this binary",
             p->name);

    return -1;
}


static void
meter_unbuilt(meter_provider_t *p, const char *name)
{
    memset(p, 0, sizeof(meter_provider_t));
    p->name = name;
    p->init = meter_unbuilt_init;
}


__attribute__((weak)) void
meter_provider_stripe(meter_provider_t *p)
{
    meter_unbuilt(p, "stripe");
}


__attribute__((weak)) void
meter_provider_chargebee(meter_provider_t *p)
{
    meter_unbuilt(p, "chargebee");
}


__attribute__((weak)) void
meter_provider_recurly(meter_provider_t *p)
{
    meter_unbuilt(p, "recurly");
}


__attribute__((weak)) void
meter_provider_http(meter_provider_t *p)
{
    meter_unbuilt(p, "http");
}


__attribute__((weak)) void
meter_provider_metronome(meter_provider_t *p)
{
    meter_unbuilt(p, "metronome");
}


int
meter_provider_by_name(const char *name, meter_provider_t *p)
{
    static const struct {
        const char  *name;
        void       (*fill)(meter_provider_t *p);
    } providers[] = {
        { "file", meter_provider_file },
        { "stripe", meter_provider_stripe },
        { "chargebee", meter_provider_chargebee },
        { "recurly", meter_provider_recurly },
        { "http", meter_provider_http },
        { "metronome", meter_provider_metronome },
    };

    size_t  i;

    for (i = 0; i < sizeof(providers) / sizeof(providers[0]); i++) {
        if (strcmp(name, providers[i].name) == 0) {
            memset(p, 0, sizeof(meter_provider_t));
            providers[i].fill(p);
            return 0;
        }
    }

    return -1;
}
