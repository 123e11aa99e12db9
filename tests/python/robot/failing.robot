*** Settings ***
Library    JmpLibrary

*** Test Cases ***
Boot Then Wait For What Never Comes
    Connect To Exporter    selector=vendor=acme,model=widget-v2
    Power Cycle    0.2
    Read Serial Until    boot complete
    Write Serial    echo-marker-4711
    Read Serial Until    kernel panic    timeout=1
