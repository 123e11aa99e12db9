*** Settings ***
Library    JmpLibrary

*** Test Cases ***
Device Boot Test
    Connect To Exporter    selector=vendor=acme,model=widget-v2
    Power On
    ${output}=    Read Serial Until    boot complete
    Should Not Be Empty    ${output}
    Power Off

Power Off Is Quiet And On Boots Again
    Power Off
    Read Serial    timeout=1
    Serial Should Stay Quiet    1
    Write Serial    root
    Serial Should Stay Quiet    1
    Power Cycle    0.2
    ${boot}=    Read Serial Until    boot complete
    Should Contain    ${boot}    U-Boot SPL
    Read Serial Until    login:
    Power Off
    Release Board
